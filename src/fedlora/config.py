"""The typed run configuration: YAML presets, dotted ``key=value`` overrides, and the seeds' ``main.py`` flags.

    fedlora run configs/default.yaml method.name=flora federation.rounds=3
    fedlora run --global_model ... --florist True --num_clients 8 --threshold 0.9

Every field is validated before anything is trained; a typo is an error that names the key and the valid ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedlora.methods import METHODS
from fedlora.privacy.settings import PrivacyConfig
from fedlora.train import TrainSettings

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CLIENT_DP_METHODS_WHY = (
    "flexlora and fedex release functions of each client's own factor product (an SVD of the exact sum started "
    "from non-zero adapters; an exact residual) whose sensitivity a clip of the uploads does not bound"
)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what would be valid."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodConfig(Strict):
    name: str = Field("florist", description=f"aggregation method: {', '.join(METHODS)}")
    threshold: float = Field(0.9, gt=0, le=1, description="FLoRIST energy threshold tau in (0, 1]")
    max_rank: int | None = Field(None, ge=1, description="cap on the global rank (florist, flexlora)")
    init_mode: Literal["federated", "pooled", "seeded"] = Field(
        "federated",
        description="fedsb: how clients agree on B and A: federated (each client sends its gradient estimate "
        "once), pooled (the reference: gradient on all clients' pooled data, NOT federated), seeded (random)",
    )
    init_samples: int = Field(170, ge=1, description="fedsb: examples per client for the gradient estimate")

    @model_validator(mode="after")
    def _known(self) -> MethodConfig:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; valid: {', '.join(METHODS)}")
        return self

    def options(self) -> dict[str, Any]:
        """The options the chosen method takes."""
        if self.name == "florist":
            return {"threshold": self.threshold, "max_rank": self.max_rank}
        if self.name == "flexlora":
            return {"max_rank": self.max_rank}
        return {}


class LoraSettings(Strict):
    r: int = Field(16, ge=1, description="LoRA rank of every client (homogeneous)")
    alpha: float = Field(32, gt=0, description="lora_alpha (homogeneous)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    heterogeneous: bool = Field(False, description="per-client ranks from local_ranks (the seeds' --heter)")
    local_ranks: list[int] = Field(default_factory=lambda: [64, 32, 16, 16, 8, 8, 4, 4])
    alpha_per_rank: float = Field(2.0, gt=0, description="heterogeneous: lora_alpha = alpha_per_rank * r_k")

    def rank_of(self, client: int) -> int:
        return self.local_ranks[client] if self.heterogeneous else self.r

    def alpha_of(self, client: int) -> float:
        return self.alpha_per_rank * self.rank_of(client) if self.heterogeneous else self.alpha


class DataConfig(Strict):
    source: str = Field("commonsense", description="built-in name, JSON/JSONL file, seeds' folder or hub id")
    tasks: list[str] | None = Field(
        None, description="built-in data only: the tasks to use, e.g. [boolq] (None: all of them)"
    )
    template: str = Field("alpaca", description="prompt template: alpaca, commonsense")
    num_clients: int = Field(8, ge=1)
    partition: Literal["dirichlet", "iid", "shards"] = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0)
    category_field: str = "category"
    min_client_size: int = Field(40, ge=1)
    holdout_per_category: int = Field(10, ge=0, description="examples per category held out as the test set")
    shards_per_client: int = Field(2, ge=1)
    max_examples_per_category: int | None = Field(
        None, ge=1, description="sub-sample each category (built-in data) before splitting"
    )
    max_examples_per_client: int | None = Field(None, ge=1, description="truncate each client's shard")
    cutoff_len: int = Field(512, ge=8)
    train_on_inputs: bool = True
    add_eos: bool = True
    eval_examples: int = Field(64, ge=0, description="size of the fixed held-out evaluation set (0: none)")


class FederationConfig(Strict):
    rounds: int = Field(3, ge=1)
    client_fraction: float = Field(1.0, gt=0, le=1, description="share of clients selected each round")
    weighting: Literal["data", "uniform"] = "data"


class EvalConfig(Strict):
    base: bool = Field(True, description="evaluate the base model before round 1")
    every: int = Field(1, ge=0, description="evaluate the global model every this many rounds (0: last only)")
    batch_size: int = Field(8, ge=1)
    tasks: list[str] = Field(
        default_factory=list,
        description="task accuracy besides the held-out loss: mmlu, boolq, piqa, ... (fedlora eval)",
    )
    limit: int | None = Field(None, ge=1, description="the first N questions of every task (of every MMLU subject)")
    scorer: Literal["loglik", "generate"] | None = Field(None, description="None: each task's default scorer")


class RunConfig(Strict):
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    model: str = Field("smollm2-135m-instruct", description="built-in name, local folder or hub id")
    output_dir: str = "runs/default"
    seed: int = Field(42, ge=0)
    device: str = "auto"
    comm_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="dtype of transmitted tensors")
    method: MethodConfig = Field(default_factory=MethodConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        self._check_privacy()
        lora, method = self.lora, METHODS[self.method.name]
        if lora.heterogeneous:
            if len(lora.local_ranks) != self.data.num_clients:
                raise ValueError(
                    f"lora.local_ranks has {len(lora.local_ranks)} entries but data.num_clients is "
                    f"{self.data.num_clients}; give one rank per client"
                )
            if any(r < 1 for r in lora.local_ranks):
                raise ValueError(f"lora.local_ranks must be positive, got {lora.local_ranks}")
            if not method.heterogeneous and len(set(lora.local_ranks)) > 1:
                hetero = [n for n, m in METHODS.items() if m.heterogeneous]
                raise ValueError(
                    f"method {self.method.name!r} needs one rank for all clients but lora.local_ranks is "
                    f"{lora.local_ranks}; heterogeneous ranks work with {', '.join(hetero)}"
                )
        return self

    def _check_privacy(self) -> None:
        privacy, name = self.privacy, self.method.name
        if privacy.enabled and self.train.gradient_checkpointing:
            raise ValueError("privacy.enabled (DP-SGD) does not support train.gradient_checkpointing; turn it off")
        if privacy.any and name == "fedsb" and self.method.init_mode != "seeded" and not privacy.allow_unprotected_init:
            raise ValueError(
                f"method.init_mode={self.method.init_mode} computes Fed-SB's B and A from the clients' data without "
                "privacy, which no reported epsilon covers; use method.init_mode=seeded, or set "
                "privacy.allow_unprotected_init=true to accept (and report) the leak"
            )
        if privacy.client.enabled:
            from fedlora.privacy.client_level import CLIENT_DP_METHODS

            if name not in CLIENT_DP_METHODS:
                raise ValueError(
                    f"privacy.client does not support method {name!r}; valid: {', '.join(CLIENT_DP_METHODS)} "
                    f"({CLIENT_DP_METHODS_WHY})"
                )
            if self.federation.weighting != "uniform":
                raise ValueError(
                    "privacy.client needs federation.weighting=uniform: with data-size weights one client's "
                    "influence on the average (the sensitivity) is not bounded by the clip norm"
                )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A preset (a path or a name in ``configs/``) plus dotted ``key=value`` overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(resolve_preset(path))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return validate(data)


def validate(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_errors(err)) from None


def resolve_preset(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    for name in (f"{path}", f"{path}.yaml"):
        if (CONFIG_DIR / name).is_file():
            return CONFIG_DIR / name
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"config {str(path)!r} not found; give a YAML file or a preset: {', '.join(presets)}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value``; the value is parsed as YAML (numbers, booleans, lists like ``[q_proj,v_proj]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. method.name=flora")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts, checking each part against the schema so typos fail early."""
    parts = key.split(".")
    model: type[BaseModel] | None = RunConfig
    node = data
    for i, part in enumerate(parts):
        if model is not None:
            fields = model.model_fields
            if part not in fields:
                where = ".".join(parts[:i]) or "the top level"
                raise ConfigError(f"unknown config key {key!r}: {part!r} is not in {where}; valid: {', '.join(fields)}")
            annotation = fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is a value, not a section")


def describe_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        lines.append(f"{where}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


# ----------------------------------------------------------------------------------- the seeds' flags

SEED_FLAGS: dict[str, str] = {
    "global_model": "model",
    "data_path": "data.source",
    "output_dir": "output_dir",
    "num_communication_rounds": "federation.rounds",
    "local_num_epochs": "train.epochs",
    "num_clients": "data.num_clients",
    "threshold": "method.threshold",
    "local_ranks": "lora.local_ranks",
    "local_batch_size": "train.batch_size",
    "local_micro_batch_size": "train.micro_batch_size",
    "local_learning_rate": "train.learning_rate",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "cutoff_len": "data.cutoff_len",
    "train_on_inputs": "data.train_on_inputs",
    "client_selection_frac": "federation.client_fraction",
    "heter": "lora.heterogeneous",
    "seed": "seed",
}
METHOD_FLAGS = {"fedit": "fedit", "flora": "flora", "florist": "florist", "stacking": "flora", "zero_padding": "fedit"}


def seed_flags_to_overrides(args: list[str]) -> list[str]:
    """Translate ``--flag value`` / ``--flag=value`` pairs of the seeds' ``main.py`` into dotted overrides.

    ``--florist True`` (or ``--fedit``, ``--flora``, ``--stacking``, ``--zero_padding``) picks the method;
    ``--lora_target_modules '[q_proj,v_proj]'`` and ``--local_ranks '[64,32,...]'`` take the seeds' list syntax.
    A folder given as ``--data_path`` is read in the seeds' layout (``local_training_{k}.json``).
    """
    pairs = _flag_pairs(args)
    overrides: list[str] = []
    chosen = [METHOD_FLAGS[f] for f, v in pairs if f in METHOD_FLAGS and _truthy(v)]
    if len(set(chosen)) > 1:
        raise ConfigError(f"the seed flags pick several methods: {sorted(set(chosen))}; set only one to True")
    for flag, value in pairs:
        if flag in METHOD_FLAGS:
            continue
        if flag not in SEED_FLAGS:
            valid = ", ".join(f"--{f}" for f in [*SEED_FLAGS, *METHOD_FLAGS])
            raise ConfigError(f"unknown flag --{flag}; the seeds' flags are: {valid}")
        overrides.append(f"{SEED_FLAGS[flag]}={_seed_value(value)}")
    if chosen:
        overrides.append(f"method.name={chosen[0]}")
    if chosen and chosen[0] == "florist" and not any(f == "threshold" for f, _ in pairs):
        overrides.append("method.threshold=0.9")
    return overrides


def _flag_pairs(args: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected a --flag, got {arg!r}")
        if "=" in arg:
            flag, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            flag, value = arg[2:], args[i + 1]
            i += 2
        else:
            flag, value = arg[2:], "True"
            i += 1
        pairs.append((flag, value))
    return pairs


def _truthy(value: str) -> bool:
    if value.lower() in {"true", "1", "yes"}:
        return True
    if value.lower() in {"false", "0", "no"}:
        return False
    raise ConfigError(f"expected True or False, got {value!r}")


def _seed_value(value: str) -> str:
    """The seeds write lists as ``[q_proj,v_proj]`` and booleans as ``True``; YAML reads both."""
    return json.dumps(_truthy(value)) if value.lower() in {"true", "false"} else value

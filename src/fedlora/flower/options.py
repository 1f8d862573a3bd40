"""The Flower app's run config (``[tool.flwr.app.config]``, ``flwr run --run-config``) and node config keys.

The run config mirrors ``fedlora run``: a preset name or YAML path plus dotted ``key=value`` overrides, and the
options of the federated runtime (how many replies a round needs, how long to wait, how often to retry).

    flwr run . --run-config 'config="tiny" overrides="method.name=flora federation.rounds=2"'
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedlora.config import ConfigError, RunConfig, load_config

#: node config keys (``flower-supernode --node-config``; set by the simulation engine for simulated nodes)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"


@dataclass(frozen=True)
class FlowerOptions:
    config: str = "default"  # preset name or YAML path, as ``fedlora run CONFIG``
    overrides: tuple[str, ...] = ()  # dotted key=value, as ``fedlora run CONFIG key=value ...``
    resume: bool = False
    overwrite: bool = False
    min_replies: int = 1  # a round aggregates if at least this many selected clients replied with valid tensors
    round_timeout: float = 3600.0  # seconds to wait for the replies of one exchange
    max_retries: int = 1  # re-sends of a round to the clients that failed, before giving up
    connect_timeout: float = 300.0  # seconds to wait for every partition's node at the start

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerOptions:
        """Read Flower's run config; unknown keys are an error naming the valid ones."""
        names = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        unknown = sorted(set(run_config) - set(names))
        if unknown:
            raise ConfigError(f"unknown Flower run config key(s) {unknown}; valid: {', '.join(sorted(names))}")
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = names[key]
            if name == "overrides":
                value = tuple(shlex.split(value)) if isinstance(value, str) else tuple(value)
            values[name] = value
        options = cls(**values)
        if int(options.min_replies) < 1:
            raise ConfigError(f"run config min-replies must be >= 1, got {options.min_replies}")
        if int(options.max_retries) < 0:
            raise ConfigError(f"run config max-retries must be >= 0, got {options.max_retries}")
        if float(options.round_timeout) <= 0 or float(options.connect_timeout) <= 0:
            raise ConfigError("run config round-timeout and connect-timeout must be positive (seconds)")
        if options.resume and options.overwrite:
            raise ConfigError("run config resume continues a run and overwrite replaces it: choose one")
        return options

    def run_config(self) -> RunConfig:
        """The fedlora ``RunConfig`` (validated), as ``fedlora run CONFIG key=value ...`` builds it."""
        return load_config(self.config, list(self.overrides))

    def with_overrides(self, *items: str) -> FlowerOptions:
        return FlowerOptions(**{**self.__dict__, "overrides": (*self.overrides, *items)})

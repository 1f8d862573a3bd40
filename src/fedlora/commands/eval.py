"""``fedlora eval``: evaluate a model (and optionally a PEFT adapter) on MMLU, commonsense, GSM8K, MATH or files."""

from __future__ import annotations

import json
import os
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:
    from fedlora.evaluate import TaskResult

EVAL_HELP = (
    "Evaluate a model, or a model with a LoRA adapter, on MMLU, commonsense, GSM8K, MATH or files.\n\n"
    "\b\n"
    "  fedlora eval -m smollm2-135m-instruct -t mmlu,boolq,piqa --limit 20\n"
    "  fedlora eval -m smollm2-135m-instruct -a runs/default/adapter -t commonsense --scorer generate --json\n"
    "  fedlora eval --export-lm-eval lm_eval_tasks      (task YAMLs for lm-evaluation-harness)\n\n"
    "Tasks: mmlu (the seeds' 1,444 questions), mmlu_full, boolq, piqa, siqa, hellaswag, winogrande, arc_easy, "
    'arc_challenge, obqa (or "commonsense" for the eight), gsm8k, math500, math, math_<subject>, or a local '
    ".json/.jsonl file: multiple choice {question, choices, answer} or open answer {question, answer}.\n\n"
    "Scorers: loglik (multiple choice: compare the answers' log-likelihoods) or generate (the seeds' generation "
    "protocols); by default each task's own (loglik for multiple choice, generate for GSM8K / MATH). Every result "
    "names its protocol: numbers from different protocols are not comparable.\n\n"
    "--export-lm-eval DIR writes lm-evaluation-harness task YAMLs and their data (mmlu, mmlu_full and the "
    "commonsense sets, or --tasks), for `lm_eval --model hf ... --include_path DIR`."
)


class ScorerChoice(StrEnum):
    loglik = "loglik"
    generate = "generate"


def eval_(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Built-in name, local folder or Hugging Face id.")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", "-t", help="Comma-separated task names or .json/.jsonl files.")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="A PEFT adapter folder to load on top of the model.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="The first N questions of each task (of each subject for mmlu, math).")
    ] = None,
    scorer: Annotated[ScorerChoice | None, typer.Option(help="loglik or generate; default: per task.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Questions per forward pass.")] = 8,
    shots: Annotated[int, typer.Option(help="MMLU loglik: solved dev examples before each question.")] = 0,
    template: Annotated[
        str | None,
        typer.Option(help="Prompt template of instruction prompts (alpaca, commonsense); default: per protocol."),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Generation length (default 32; 512 for math).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (MMLU generate).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON (no table).")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the JSON results here.")] = None,
    export_lm_eval: Annotated[
        Path | None,
        typer.Option("--export-lm-eval", help="Write lm-eval task YAMLs and data to this folder, then exit."),
    ] = None,
) -> None:
    """Evaluate a model (and adapter) on MMLU, commonsense, GSM8K, MATH or local files."""
    from fedlora.data import DataError, get_template
    from fedlora.evaluate import EvalError, evaluate, resolve_tasks, task_scorers, valid_task_names

    if export_lm_eval is not None:
        _export(export_lm_eval, tasks, template)
        return
    if model is None:
        _fail("--model is required (a built-in name, a local folder or a Hugging Face id)", code=2)
    if not tasks:
        _fail(f"--tasks is required; valid: {valid_task_names()}", code=2)
    for name, value, minimum in (("--limit", limit, 1), ("--batch-size", batch_size, 1), ("--shots", shots, 0)):
        if value is not None and value < minimum:
            _fail(f"{name} must be >= {minimum}, got {value}", code=2)
    if max_new_tokens is not None and max_new_tokens < 1:
        _fail(f"--max-new-tokens must be >= 1, got {max_new_tokens}", code=2)
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        _fail(f"--adapter {str(adapter)!r} is not a PEFT adapter folder (no adapter_config.json)", code=2)
    try:
        names = resolve_tasks(tasks)
        if template is not None:
            get_template(template)
    except (EvalError, DataError) as err:
        _fail(str(err), code=2)
    try:
        for name in names:  # reads local files now: a bad file fails before the model loads
            allowed = task_scorers(name)
            if scorer is not None and scorer.value not in allowed:
                _fail(f"task {name!r}: scorer {scorer.value!r} does not apply; valid for it: {', '.join(allowed)}", 2)
    except EvalError as err:
        _fail(str(err))

    console = Console(stderr=True, soft_wrap=True)
    start = time.perf_counter()
    lm, tokenizer, where = _load(model, adapter, device, console)
    try:
        with _ProgressBar(console) as report:
            results = evaluate(
                lm,
                tokenizer,
                names,
                limit=limit,
                scorer=None if scorer is None else scorer.value,
                batch_size=batch_size,
                template=template,
                shots=shots,
                max_new_tokens=max_new_tokens,
                seed=seed,
                progress=report,
            )
    except (EvalError, OSError) as err:
        _fail(str(err))
    payload = {
        "model": model,
        "model_path": where,
        "adapter": None if adapter is None else str(adapter),
        "tasks": {name: result.to_dict() for name, result in results.items()},
        "seconds": round(time.perf_counter() - start, 3),
    }
    if output is not None:
        _write_json(output, payload)
    if json_output:
        typer.echo(json.dumps(payload, indent=2))
    else:
        _print_table(results, model, adapter)
        if output is not None:
            Console().print(f"[green]wrote {escape(str(output))}[/green]")


def _load(model: str, adapter: Path | None, device: str, console: Console) -> tuple[Any, Any, str | None]:
    from fedlora.models import load_model
    from fedlora.train import select_device

    try:
        target = select_device(device)
        with console.status(f"loading {escape(model)}"):
            loaded = load_model(model, device=target)
    except (ValueError, OSError) as err:
        _fail(f"could not load model {model!r}: {err}")
    lm = loaded.model
    if adapter is not None:
        from peft import PeftModel

        try:
            lm = PeftModel.from_pretrained(lm, str(adapter)).to(target)
        except (ValueError, OSError, RuntimeError, KeyError) as err:
            _fail(f"could not load adapter {str(adapter)!r} on {model!r}: {err}")
    return lm, loaded.tokenizer, loaded.path


class _ProgressBar:
    """A rich progress bar with one line per task; ``report(task, done, total)`` advances it."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.ids: dict[str, Any] = {}
        self.started: dict[str, float] = {}

    def __enter__(self) -> Any:
        self.progress.start()
        return self.report

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def report(self, task: str, done: int, total: int) -> None:
        if task not in self.ids:
            self.ids[task] = self.progress.add_task(task, total=total, rate="")
            self.started[task] = time.perf_counter()
        elapsed = time.perf_counter() - self.started[task]
        rate = f"{done / elapsed:.2f} q/s" if elapsed > 0 else ""
        self.progress.update(self.ids[task], completed=done, total=total, rate=rate)


def _print_table(results: dict[str, TaskResult], model: str, adapter: Path | None) -> None:
    title = f"{model}" + (f" + {adapter}" if adapter is not None else "")
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    table.add_column("accuracy", justify="right")
    table.add_column("questions", justify="right")
    table.add_column("micro", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("protocol")
    for name, r in results.items():
        micro = r.extra.get("micro_accuracy")
        table.add_row(
            escape(name),
            f"{100 * r.accuracy:.2f}",
            str(r.num_questions),
            "" if micro is None or micro == r.accuracy else f"{100 * micro:.2f}",
            f"{r.seconds:.1f}",
            escape(r.protocol),
        )
    Console().print(table)


def _export(folder: Path, tasks: str | None, template: str | None) -> None:
    from fedlora.evaluate import EvalError
    from fedlora.lm_eval_tasks import export_lm_eval_tasks

    console = Console(stderr=True, soft_wrap=True)
    try:
        with console.status("exporting lm-eval tasks"):
            result = export_lm_eval_tasks(folder, tasks, template=template or "commonsense")
    except (EvalError, OSError) as err:
        _fail(str(err), code=2 if isinstance(err, EvalError) and "no lm-eval export" in str(err) else 1)
    out = Console(soft_wrap=True)
    out.print(f"[green]wrote {result.questions:,} questions and task YAMLs to {escape(str(result.folder))}[/green]")
    for ours, theirs in result.tasks.items():
        out.print(f"  {escape(ours)} -> {escape(theirs)}")
    names = ",".join(dict.fromkeys(result.tasks.values()))
    out.print(
        "run, e.g.: HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=MODEL_DIR[,peft=ADAPTER_DIR] "
        f"--tasks {escape(names)} --include_path {escape(str(result.folder))}"
    )


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write beside the target, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]Error:[/bold red] [red]{escape(message)}[/red]")
    raise typer.Exit(code)

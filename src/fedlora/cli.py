"""The ``fedlora`` command line. Each sub-command lives in ``fedlora.commands.<name>``."""

from __future__ import annotations

import typer

from fedlora import __version__
from fedlora.commands import aggregate, comm, compare, report, run, split
from fedlora.commands import eval as eval_

app = typer.Typer(
    name="fedlora",
    help="Federated fine-tuning of LLMs with low-rank adapters (FLoRIST, FLoRA, FedIT, FlexLoRA, FFA-LoRA, "
    "FedEx-LoRA, Fed-SB).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("aggregate")(aggregate.aggregate)
app.command("comm")(comm.comm)
app.command("split")(split.split)
app.command("eval", help=eval_.EVAL_HELP)(eval_.eval_)
app.command(
    "compare", help=compare.COMPARE_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)(compare.compare)
app.command("report", help=report.REPORT_HELP)(report.report)
app.command(
    "run",
    help=run.RUN_HELP,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(run.run)


@app.command("version")
def version() -> None:
    """Print the fedlora version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The fedlora ServerApp (``[tool.flwr.app.components] serverapp``): the engine's server on a Flower Grid."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.engine.local import Engine, RunSummary
from fedlora.flower.options import FlowerOptions
from fedlora.flower.strategy import FedLoraStrategy

log = logging.getLogger("fedlora.flower")


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> RunSummary:
    """Read the run config, build the engine and the strategy, and run every round on ``grid``."""
    options = FlowerOptions.from_run_config(run_config)
    engine = Engine(options.run_config(), resume=options.resume, overwrite=options.overwrite, progress=False)
    summary = FedLoraStrategy(engine, options).start(grid)
    log.info(
        "fedlora run finished: %s, %d rounds, eval loss %s -> %s, uplink %d B, downlink %d B, %.1f s; adapter in %s",
        summary.method,
        summary.rounds,
        summary.eval_before,
        summary.eval_after,
        summary.uplink_bytes,
        summary.downlink_bytes,
        summary.seconds,
        summary.run_dir / "adapter",
    )
    return summary


def make_server_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` entries override the context's (``run_simulation`` passes an empty one)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("fedlora").setLevel(logging.INFO)
        run_server(grid, {**context.run_config, **(run_config or {})})

    return app


app = make_server_app()

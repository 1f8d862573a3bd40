"""The fedlora ClientApp (``[tool.flwr.app.components] clientapp``): the engine's client on this node's partition.

Node config: ``partition-id`` and ``num-partitions`` (the simulation sets them; a SuperNode gets them from
``--node-config``), and optionally ``data-path``, a JSON/JSONL file of this client's own records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.flower.client import runtime_for


def make_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` entries override the context's (``run_simulation`` passes an empty one)."""
    app = ClientApp()
    extra = dict(run_config or {})

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        return runtime_for(context, extra).hello(msg, context)

    @app.query("sync")
    def sync(msg: Message, context: Context) -> Message:
        return runtime_for(context, extra).sync(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return runtime_for(context, extra).train(msg, context)

    @app.train("fedsb_init")
    def fedsb_init(msg: Message, context: Context) -> Message:
        return runtime_for(context, extra).fedsb_init(msg, context)

    return app


app = make_client_app()

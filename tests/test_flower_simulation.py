"""Flower's simulation runtime (Ray): the global adapter after 2 rounds equals the in-process engine's (atol 1e-5).

One Ray instance serves the four runs (Ray's start-up is most of a simulation's wall time on a small machine);
``flwr run .`` itself is exercised by ``test_flwr_run_cli``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
ray = pytest.importorskip("ray")

from fedlora.config import load_config  # noqa: E402
from fedlora.engine.local import Engine  # noqa: E402
from flower_helpers import FLOWER_ENV, assert_same_bytes, assert_same_global_adapter, metrics  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray for the module; ``run_simulation`` finds it initialised and its shutdown is deferred."""
    saved = {k: os.environ.get(k) for k in FLOWER_ENV}
    os.environ.update(FLOWER_ENV)
    ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False)
    real_shutdown = ray.shutdown
    ray.shutdown = lambda *a, **k: None
    try:
        yield
    finally:
        ray.shutdown = real_shutdown
        real_shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.parametrize("method", ["fedit", "flora", "florist", "fedsb"])
def test_ray_simulation_equals_engine(tmp_path: Path, shared_ray, method: str) -> None:
    from flwr.simulation import run_simulation

    from fedlora.flower.client_app import make_client_app
    from fedlora.flower.server_app import make_server_app

    engine_dir, flower_dir = tmp_path / "engine", tmp_path / "flower"
    common = [f"method.name={method}", "federation.rounds=2"]
    Engine(load_config("tiny", [f"output_dir={engine_dir}", *common]), progress=False).run()
    run_config = {"config": "tiny", "overrides": " ".join([f"output_dir={flower_dir}", *common])}
    run_simulation(
        make_server_app(run_config),
        make_client_app(run_config),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    assert [m["round"] for m in metrics(flower_dir)] == [0, 1, 2]
    assert_same_global_adapter(engine_dir, flower_dir)
    assert_same_bytes(engine_dir, flower_dir)


def test_flwr_run_cli(tmp_path: Path) -> None:
    """``flwr run .`` from the repository on a local simulation SuperLink (stopped by its pid afterwards)."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    port_base = 39400 + os.getpid() % 500
    env = {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port_base),
        "FLWR_LOCAL_CONTROL_API_PORT": str(port_base + 2),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    run_dir = tmp_path / "run"
    overrides = f"output_dir={run_dir} method.name=florist federation.rounds=2"
    cmd = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        ".",
        "--run-config",
        f'config="tiny" overrides="{overrides}"',
        "--federation-config",
        "num-supernodes=3",
        "--stream",
    ]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert [m["round"] for m in metrics(run_dir)] == [0, 1, 2], done.stdout[-3000:]
        engine_dir = tmp_path / "engine"
        Engine(
            load_config("tiny", [f"output_dir={engine_dir}", "method.name=florist", "federation.rounds=2"]),
            progress=False,
        ).run()
        assert_same_global_adapter(engine_dir, run_dir)
    finally:
        _stop_local_superlink(home)


def _stop_local_superlink(home: Path) -> None:
    """The background SuperLink ``flwr run`` started for this FLWR_HOME: found by its --database path, killed by pid."""
    import signal
    import time

    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in args and str(home) in args:
            pid = int(proc.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.2)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

"""A real Flower deployment on loopback: one SuperLink, two SuperNodes (one per partition), ``flwr run`` against it.

Telemetry is off and runtime dependency installation disabled; every process the test starts runs in its own
process group and is stopped by its pid in the fixture's teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedlora.engine.state import load_state
from flower_helpers import FLOWER_ENV, free_port, metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Deployment:
    """SuperLink + SuperNodes as child processes; ``stop`` kills each one's process group by pid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            **FLOWER_ENV,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.port = free_port()  # flwr 1.41: the Fleet, Control and Runtime APIs share one HTTP port
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(
            args, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        self.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--port",
                str(self.port),
                "--database",
                str(self.root / "state.db"),
            ],
        )

    def start_supernode(self, k: int, num: int) -> None:
        self.start(
            f"supernode{k}",
            [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={k} num-partitions={num}",
            ],
        )

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the SuperNode and its ClientApp subprocesses
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)

    def flwr_run(self, run_config: str) -> subprocess.Popen:
        return self.start(
            "flwr-run",
            [str(BIN / "flwr"), "run", str(REPO), "loopback", "--run-config", run_config, "--stream"],
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.root.glob("*.log")))


@pytest.fixture
def deployment(tmp_path: Path):
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()


def wait_for(predicate, timeout: float, what: str, dep: Deployment) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{dep.logs()}")


def test_superlink_two_supernodes_two_rounds_and_a_killed_supernode(deployment: Deployment, tmp_path: Path) -> None:
    """Two rounds on loopback; SuperNode 1 is killed after round 1: round 2 aggregates client 0 alone."""
    dep = deployment
    dep.start_superlink()
    for k in range(2):
        dep.start_supernode(k, 2)
    run_dir = tmp_path / "run"
    overrides = f"output_dir={run_dir} method.name=florist data.num_clients=2 federation.rounds=2"
    run = dep.flwr_run(f'config="tiny" overrides="{overrides}" round-timeout=60.0 max-retries=0 connect-timeout=120.0')
    metrics_file = run_dir / "metrics.jsonl"

    def round_done(r: int) -> bool:
        return metrics_file.exists() and any(m["round"] == r for m in metrics(run_dir))

    wait_for(lambda: round_done(1) or run.poll() is not None, 240, "round 1", dep)
    assert round_done(1), dep.logs()
    dep.kill("supernode1")  # mid-run: round 2's messages to it never get a reply
    wait_for(lambda: round_done(2) or run.poll() is not None, 240, "round 2", dep)
    wait_for(lambda: (run_dir / "adapter" / "adapter_model.safetensors").exists(), 60, "the adapter", dep)
    lines = metrics(run_dir)
    assert [m["round"] for m in lines] == [0, 1, 2], dep.logs()
    # Round 1: both nodes reply (a cold ClientApp process imports torch and builds the model: round-timeout 60 s).
    assert lines[1]["selected"] == [0, 1] and all(c["uplink_bytes"] > 0 for c in lines[1]["clients"]), lines[1]
    assert lines[2]["selected"] == [0] and "1" in lines[2]["failed"], lines[2]
    assert load_state(run_dir).round == 2

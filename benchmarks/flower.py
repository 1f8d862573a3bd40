"""Wall time of one federated run three ways: the in-process engine, Flower simulation (Ray), a loopback deployment.

All three run the same 2-round federation (the ``tiny`` preset on the built-in ``tiny-llama`` model, FLoRIST,
2 clients, seed 0) and must end with the same global adapter; the script prints the largest difference of the
exported adapter tensors (and of their products ``B @ A``), then a table of seconds and ratios against the
in-process ``Engine(config).run()`` call. It never asserts.

- **engine**: ``Engine(load_config("tiny", ...)).run()`` in this process (model, data and evaluation included,
  imports not); ``fedlora run`` as a child process adds the interpreter and its imports.
- **simulation**: ``flwr run . --federation-config num-supernodes=2 --stream`` from the repository root with a
  ``:local:`` connection. Flower starts a background SuperLink (``--simulation``), builds the FAB, and a
  ``flwr-simulation`` process runs the ServerApp and Ray, whose actors run the ClientApps.
- **deployment**: ``flower-superlink --insecure`` and two ``flower-supernode --insecure`` on free loopback ports
  (``--node-config 'partition-id=K num-partitions=2'``); once both SuperNodes are online (``flwr supernode list``),
  ``flwr run . loopback --stream`` is timed alone; the row "incl. SuperLink+2 SuperNodes" adds the time from
  launching the SuperLink until then. A SuperNode starts one ``flwr-clientapp`` process per message it receives
  (each imports torch and fedlora and builds the model), which dominates its rounds on a small machine; the script
  counts them.

Where the time goes: the script watches ``metrics.jsonl`` and notes when each line appears, counted from the launch.
"to round 0" is launch -> the round-0 line (set-up: processes, imports, model, data, base evaluation; in the Flower
runs also FAB build and submission); "rounds" is round-0 line -> last round's line (training rounds, each with its
messages and evaluation); the rest of the wall time is adapter export and shutdown. Ray's start-up is measured
alone in a fresh interpreter: ``import ray``, then ``ray.init(include_dashboard=False)`` as Flower's Ray backend
calls it, then ``ray.shutdown()``; its share is that sum over the simulation's wall time (in the simulation Ray
starts alongside the ServerApp's set-up, so the share bounds what Ray itself adds; the first round also starts the
actors, which import fedlora and torch).

Every process the script starts runs with a private FLWR_HOME in a temporary folder and is stopped in a ``finally``
block: the children by their process group, then any process (the local SuperLink, Ray) still carrying that
FLWR_HOME by its pid. Telemetry, update checks and runtime dependency installation are off; OMP_NUM_THREADS=1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flower.py            # about 1-3 minutes on 2 CPU cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flower.py --keep     # keep the run folders and logs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _key, _value in FLOWER_ENV.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedlora.config import load_config  # noqa: E402
from fedlora.engine.local import Engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRESET = "tiny"
CLIENTS = 2
ROUNDS = 2


def overrides(run_dir: Path) -> list[str]:
    """The one set of settings every path runs: tiny preset, FLoRIST, 2 clients, 2 rounds."""
    return [
        f"output_dir={run_dir}",
        "method.name=florist",
        f"data.num_clients={CLIENTS}",
        f"federation.rounds={ROUNDS}",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MetricsWatch:
    """Notes when each round's line appears in ``metrics.jsonl``, in seconds since ``start`` (polled every 50 ms)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.seen: dict[int, float] = {}
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self._read()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self.seen.setdefault(int(json.loads(line)["round"]), time.perf_counter() - self.start)

    def stop(self) -> float:
        """Stop watching; return the wall time since ``start``."""
        wall = time.perf_counter() - self.start
        self._stop.set()
        self._thread.join()
        self._read()  # a line written in the last poll interval is dated at most 50 ms late
        self.seen = {r: min(t, wall) for r, t in self.seen.items()}
        return wall


class Processes:
    """Child processes in their own process groups, all with this benchmark's private FLWR_HOME."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir()
        self.children: list[subprocess.Popen] = []
        self.env = {
            **os.environ,
            **FLOWER_ENV,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # the local simulation SuperLink's ports (its defaults could collide with another user's)
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        }
        self.port = free_port()  # the loopback SuperLink: Fleet, Control and Runtime APIs on one HTTP port
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n\n'
            f'[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(
            args, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.children.append(proc)
        return proc

    def run(self, name: str, args: list[str], timeout: float) -> subprocess.Popen:
        proc = self.start(name, args)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{name}: timed out after {timeout:.0f} s; see {self.root / (name + '.log')}")
        return proc

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text()[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """Stop the children's process groups by pid, then whatever still carries this FLWR_HOME (SuperLink, Ray)."""
        for proc in self.children:
            if proc.poll() is None:
                _terminate(lambda sig, pid=proc.pid: os.killpg(pid, sig), proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for pid in self.leftovers():
            _terminate(lambda sig, pid=pid: os.kill(pid, sig), pid)

    def leftovers(self) -> list[int]:
        """Processes of this user whose environment has this benchmark's FLWR_HOME (the detached local SuperLink)."""
        marker = f"FLWR_HOME={self.home}".encode()
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            pid = int(entry.name)
            if pid == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(pid)
        return found


def _terminate(send, pid: int) -> None:
    """SIGTERM, up to 10 s of grace, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        send(signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                return
            time.sleep(0.1)
        send(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status  # a zombie child is gone, only not yet reaped


# ------------------------------------------------------------------------------------------------ the runs


def run_engine(run_dir: Path) -> dict:
    watch = MetricsWatch(run_dir)
    Engine(load_config(PRESET, overrides(run_dir)), progress=False).run()
    return {"wall": watch.stop(), "seen": watch.seen, "run_dir": run_dir}


def run_cli(procs: Processes, run_dir: Path) -> dict:
    watch = MetricsWatch(run_dir)
    procs.run("fedlora-run", [str(BIN / "fedlora"), "run", PRESET, *overrides(run_dir), "--quiet"], timeout=600)
    return {"wall": watch.stop(), "seen": watch.seen, "run_dir": run_dir}


def flwr_run_args(run_dir: Path, *connection: str) -> list[str]:
    run_config = f'config="{PRESET}" overrides="{" ".join(overrides(run_dir))}" max-retries=0'
    return [str(BIN / "flwr"), "run", ".", *connection, "--run-config", run_config, "--stream"]


def run_simulation(procs: Processes, run_dir: Path) -> dict:
    watch = MetricsWatch(run_dir)
    args = [*flwr_run_args(run_dir), "--federation-config", f"num-supernodes={CLIENTS}"]
    procs.run("flwr-run-simulation", args, timeout=900)
    return {"wall": watch.stop(), "seen": watch.seen, "run_dir": run_dir}


def supernodes_online(procs: Processes) -> int:
    done = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "loopback", "--format", "json"],
        env=procs.env,
        cwd=procs.root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    with contextlib.suppress(ValueError):
        nodes = json.loads(done.stdout).get("nodes", [])
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")
    return 0


def run_deployment(procs: Processes, run_dir: Path) -> dict:
    launch = time.perf_counter()
    procs.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--port",
            str(procs.port),
            "--database",
            str(procs.root / "state.db"),
        ],
    )
    for k in range(CLIENTS):
        procs.start(
            f"supernode{k}",
            [
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{procs.port}",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={k} num-partitions={CLIENTS}",
            ],
        )
    deadline = time.monotonic() + 120
    while supernodes_online(procs) < CLIENTS and time.monotonic() < deadline:
        time.sleep(0.5)
    ready = time.perf_counter() - launch
    watch = MetricsWatch(run_dir)
    procs.run("flwr-run-deployment", flwr_run_args(run_dir, "loopback"), timeout=900)
    wall = watch.stop()
    # a SuperNode starts one `flwr-clientapp` process per message it receives (each imports torch and fedlora)
    clientapps = [
        procs.log_tail(f"supernode{k}", 10**7).count("Start `flwr-clientapp` process") for k in range(CLIENTS)
    ]
    return {"wall": wall, "seen": watch.seen, "run_dir": run_dir, "startup": ready, "clientapps": clientapps}


def ray_startup(procs: Processes) -> dict:
    """``import ray``, ``ray.init`` (as Flower's Ray backend calls it) and ``ray.shutdown`` in a fresh interpreter."""
    code = (
        "import json, time\n"
        "t0 = time.perf_counter(); import ray; t1 = time.perf_counter()\n"
        "ray.init(include_dashboard=False, logging_level='WARNING', log_to_driver=True); t2 = time.perf_counter()\n"
        "ray.shutdown(); t3 = time.perf_counter()\n"
        "print(json.dumps({'import': t1 - t0, 'init': t2 - t1, 'shutdown': t3 - t2}))\n"
    )
    proc = procs.run("ray-startup", [sys.executable, "-c", code], timeout=300)
    lines = procs.log_tail("ray-startup", 100000).strip().splitlines()
    if proc.returncode != 0 or not lines:
        print("ray start-up measurement failed:\n" + procs.log_tail("ray-startup"))
        return {}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------ report


def adapter_difference(a: Path, b: Path) -> tuple[float, float]:
    """Max |difference| over the exported adapter tensors, and over the per-module products ``B @ A``."""
    ta = load_file(a / "adapter" / "adapter_model.safetensors")
    tb = load_file(b / "adapter" / "adapter_model.safetensors")
    if set(ta) != set(tb):
        return float("inf"), float("inf")
    tensors = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)
    products = 0.0
    for key in ta:
        if key.endswith("lora_B.weight"):
            a_key = key.replace("lora_B", "lora_A")
            delta = ta[key].double() @ ta[a_key].double() - tb[key].double() @ tb[a_key].double()
            products = max(products, float(delta.abs().max()))
    return tensors, products


def finished(result: dict) -> bool:
    return (result["run_dir"] / "adapter" / "adapter_model.safetensors").exists() and ROUNDS in result["seen"]


def row(name: str, result: dict, baseline: float) -> str:
    seen = result["seen"]
    to_round0 = seen.get(0, float("nan"))
    rounds = seen.get(ROUNDS, float("nan")) - to_round0
    rest = result["wall"] - seen.get(ROUNDS, float("nan"))
    return (
        f"| {name:<30} | {result['wall']:7.1f} | {result['wall'] / baseline:4.1f}x "
        f"| {to_round0:12.1f} | {rounds:6.1f} | {rest:6.1f} |"
    )


def report(results: dict[str, dict], ray: dict) -> None:
    base = results["engine"]
    print(f"\nSame run everywhere: {PRESET} preset, model tiny-llama, FLoRIST, {CLIENTS} clients, {ROUNDS} rounds")
    for name, result in results.items():
        if name == "engine":
            continue
        if not finished(result):
            print(f"  {name}: did not finish (no adapter or no round {ROUNDS} line); see its log")
            continue
        tensors, products = adapter_difference(base["run_dir"], result["run_dir"])
        print(f"  global adapter vs engine, {name}: max |diff| tensors {tensors:.2e}, B@A {products:.2e}")
    print(
        "\n| path                           |  wall s | ratio | to round 0 s | rounds | rest s |\n"
        "|--------------------------------|---------|-------|--------------|--------|--------|"
    )
    b = base["wall"]
    print(row("engine, in process", base, b))
    print(row("fedlora run (child process)", results["cli"], b))
    print(row("flwr run . (simulation, Ray)", results["simulation"], b))
    deployment = results["deployment"]
    print(row("flwr run . loopback (deployed)", deployment, b))
    with_startup = {**deployment, "wall": deployment["wall"] + deployment["startup"]}
    with_startup["seen"] = {r: t + deployment["startup"] for r, t in deployment["seen"].items()}
    print(row("  incl. SuperLink+2 SuperNodes", with_startup, b))
    print(
        f"\ndeployment: SuperLink + SuperNodes online after {deployment['startup']:.1f} s; the SuperNodes started "
        f"{deployment['clientapps']} `flwr-clientapp` processes (one per message received)"
    )
    if ray:
        total = ray["import"] + ray["init"] + ray["shutdown"]
        share = total / results["simulation"]["wall"]
        print(
            f"\nRay alone (fresh interpreter): import {ray['import']:.1f} s + init {ray['init']:.1f} s + "
            f"shutdown {ray['shutdown']:.1f} s = {total:.1f} s, {share:.0%} of the simulation's wall time"
        )
    print(
        "to round 0: launch -> round-0 line of metrics.jsonl (set-up and base evaluation); rounds: -> last round's"
        " line; rest: adapter export and shutdown"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (run folders, logs)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedlora-flower-bench-"))
    procs = Processes(root)
    results: dict[str, dict] = {}
    try:
        torch.set_num_threads(1)
        print(f"working in {root}")
        results["engine"] = run_engine(root / "engine")
        print(f"engine: {results['engine']['wall']:.1f} s")
        results["cli"] = run_cli(procs, root / "cli")
        print(f"fedlora run: {results['cli']['wall']:.1f} s")
        results["simulation"] = run_simulation(procs, root / "simulation")
        print(f"flwr run . (simulation): {results['simulation']['wall']:.1f} s")
        procs.stop()  # the local simulation SuperLink, before the deployment's own
        procs.children.clear()
        results["deployment"] = run_deployment(procs, root / "deployment")
        print(f"flwr run . loopback: {results['deployment']['wall']:.1f} s")
        procs.stop()
        procs.children.clear()
        ray = ray_startup(procs)
        report(results, ray)
    finally:
        procs.stop()
        left = procs.leftovers()
        if left:
            print(f"processes still running with FLWR_HOME={procs.home}: {left}")
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

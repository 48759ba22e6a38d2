"""Time each step of the main job on the lab and sample a SuperNode's memory.

    .venv/bin/python benchmarks/main_job.py [--cold] [--rounds 2]

Starts from no lab. `--cold` also deletes the cached root filesystem and
wheelhouse, so both are rebuilt. Prints the wall time of each step: lab up,
wheelhouse build, first deploy of each role, the no-op second deploy, and
the federated run. Then prints the peak memory of the first SuperNode during
the run: the summed RSS of the service user's processes, sampled every
second over SSH, which counts shared pages once per process. Leaves the lab up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from melody_deploy import wheelhouse  # noqa: E402
from melody_deploy.host_facts import PLATFORM_SCRIPT  # noqa: E402
from melody_deploy.preflight import HostSpec, validate_inventory  # noqa: E402
from melody_lab import lab as melody_lab  # noqa: E402
from melody_lab import ssh  # noqa: E402
from melody_lab.demo import parse_result, parse_run_id, researcher_env  # noqa: E402

BIN = Path(sys.executable).parent
WHEELHOUSE_CACHE = REPO / ".cache" / "wheelhouse"


def timed(title: str, timings: list, function, *args):
    started = time.monotonic()
    value = function(*args)
    elapsed = time.monotonic() - started
    timings.append((title, elapsed))
    print(f"{title}: {elapsed:.1f} s", flush=True)
    return value


def run(command: list[str], env: dict | None = None) -> str:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def build_wheelhouse(state) -> None:
    """Build the wheelhouse the deploy will use, for the lab hosts' platform."""
    superlink = state.host("superlink")
    fact = ssh.run(Path(state.ssh_key), Path(state.known_hosts), superlink.address,
                   f'python3 -c "{PLATFORM_SCRIPT}"').stdout
    target = wheelhouse.target_from_fact(json.loads(fact))
    settings = validate_inventory([HostSpec("superlink", ("superlink",), {})]).superlink.settings
    wheelhouse.build(settings, target, WHEELHOUSE_CACHE)


class MemorySampler(threading.Thread):
    """Samples the summed RSS of a lab host's `melody` processes every second."""

    def __init__(self, state, name: str):
        super().__init__(daemon=True)
        self.state = state
        self.address = state.host(name).address
        self.peak_kib = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        command = "ps -u melody -o rss= | awk '{s += $1} END {print s + 0}'"
        while not self.stopped.is_set():
            result = ssh.run(Path(self.state.ssh_key), Path(self.state.known_hosts), self.address, command)
            if result.returncode == 0 and result.stdout.strip():
                self.peak_kib = max(self.peak_kib, int(result.stdout.strip()))
            self.stopped.wait(1.0)


def federated_run(env: dict, rounds: int) -> tuple[str, dict]:
    output = run([str(BIN / "flwr"), "run", "melody_app", "lab", "--stream",
                  "--run-config", f"num-server-rounds={rounds}"], env=env)
    run_id = parse_run_id(output)
    listing = json.loads(run([str(BIN / "flwr"), "ls", "lab", "--run-id", run_id, "--format", "json"], env=env))
    return listing["runs"][0]["status"], parse_result(output)


def main() -> int:
    parser = argparse.ArgumentParser(description="Time the main job's steps on the lab.")
    parser.add_argument("--cold", action="store_true", help="delete the cached root filesystem and wheelhouse first")
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2)")
    args = parser.parse_args()

    melody_lab.down()
    if args.cold:
        shutil.rmtree(REPO / ".cache", ignore_errors=True)

    timings: list[tuple[str, float]] = []
    pyinfra = str(BIN / "pyinfra")
    state = timed("lab up" + (" (cold cache)" if args.cold else ""), timings, melody_lab.up, 2)
    timed("wheelhouse build", timings, build_wheelhouse, state)
    timed("first deploy, SuperLink", timings, run, [pyinfra, "-y", "inventories/lab.py", "deploy/superlink.py"])
    timed("first deploy, SuperNodes", timings, run, [pyinfra, "-y", "inventories/lab.py", "deploy/supernode.py"])
    timed("no-op deploy, SuperLink", timings, run, [pyinfra, "-y", "inventories/lab.py", "deploy/superlink.py"])
    timed("no-op deploy, SuperNodes", timings, run, [pyinfra, "-y", "inventories/lab.py", "deploy/supernode.py"])

    env = researcher_env(REPO / ".lab" / "researcher-flwr-home")
    run([sys.executable, "-m", "melody_deploy.researcher", "inventories/lab.py", "--connection", "lab"], env=env)
    sampler = MemorySampler(state, "supernode-1")
    sampler.start()
    status, result = timed(f"federated run, {args.rounds} rounds", timings, federated_run, env, args.rounds)
    sampler.stopped.set()
    sampler.join()

    print("\n| step | wall time (s) |\n| --- | ---: |")
    for title, elapsed in timings:
        print(f"| {title} | {elapsed:.1f} |")
    last = result["rounds"][-1]
    print(f"\nrun status: {status}; last round balanced accuracy {last['balanced_accuracy']:.4f}")
    print(f"peak RSS of supernode-1's service processes: {sampler.peak_kib / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

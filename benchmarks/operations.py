"""Compare the deploy's cost with plain baselines, and scale the lab to 1 + 16 hosts.

    .venv/bin/python benchmarks/operations.py [--supernodes 16] [--rounds 1]

Removes any running lab first, then, on a lab of 1 SuperLink and 2 SuperNodes:
- the fresh deploy of both roles (wheelhouse already cached);
- each no-op re-deploy beside `pyinfra INVENTORY exec -- true` on the same hosts;
- a bare baseline on every SuperNode in parallel: upload the same wheelhouse
  with tar over SSH, `pip install --no-index` it into a new venv, and start a
  unit with systemd-run. It runs after the deploy, so the deploy does not
  profit from a page cache the baseline warmed.
Then, on a lab of 1 SuperLink and `--supernodes` SuperNodes: the fresh deploy,
a federated run, and each host's memory (PSS of the guest's processes) at
idle and at its peak during the run. Prints Markdown tables and the ratios
that docs/benchmarks.md records. Leaves the large lab up.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from melody_lab import lab as melody_lab  # noqa: E402
from melody_lab import cgroups, ssh  # noqa: E402
from melody_lab.settings import CGROUP_PARENT  # noqa: E402
from melody_lab.control_tunnel import control_tunnel, free_local_port  # noqa: E402
from melody_lab.demo import parse_result, parse_run_id, researcher_env  # noqa: E402

BIN = Path(sys.executable).parent
PYINFRA = str(BIN / "pyinfra")
INVENTORY = "inventories/lab.py"
BASELINE_DIR = "/var/tmp/melody-baseline"


def run(command: list[str], env: dict | None = None, timeout: float = 3600) -> str:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def cpu_seconds() -> float:
    """Return the CPU seconds used so far by the lab's hosts and by this script's child processes.

    The lab's share comes from cgroup v2's cpu.stat of the lab's parent cgroup,
    which every host of the lab is in. A step's CPU seconds divided by the
    machine's cores is the least wall time that the step can take on an idle
    machine, whatever other work shares this one.
    """
    lab_usec = 0
    for root in cgroups.hierarchy_roots():
        stat = root / CGROUP_PARENT / "cpu.stat"
        if stat.exists():
            lab_usec = max(lab_usec, int(stat.read_text().split()[1]))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return lab_usec / 1e6 + children.ru_utime + children.ru_stime


CPU_SECONDS: dict[str, float] = {}


def timed(function, *args) -> tuple[float, object]:
    started, cpu_started = time.monotonic(), cpu_seconds()
    value = function(*args)
    elapsed, cpu = time.monotonic() - started, cpu_seconds() - cpu_started
    name = f"{getattr(function, '__name__', function)}{args}"
    CPU_SECONDS[name] = cpu
    print(f"{name}: {elapsed:.1f} s, {cpu:.0f} CPU s", flush=True)
    return elapsed, value


def deploy(role_file: str) -> None:
    run([PYINFRA, "-y", INVENTORY, role_file])


def exec_true(group: str) -> None:
    run([PYINFRA, "-y", INVENTORY, "--limit", group, "exec", "--", "true"])


def fresh_deploy() -> tuple[float, float]:
    superlink, _ = timed(deploy, "deploy/superlink.py")
    supernodes, _ = timed(deploy, "deploy/supernode.py")
    return superlink, supernodes


def wheelhouse_path() -> Path:
    """Return the wheelhouse folder that the deploy uploaded (the only one in the cache)."""
    candidates = [lock.parent for lock in (REPO / ".cache" / "wheelhouse").glob("*/requirements.lock")]
    if len(candidates) != 1:
        raise SystemExit(f"expected one cached wheelhouse, found {candidates}")
    return candidates[0]


def baseline_host(state, name: str, wheels: Path) -> None:
    """Upload the wheelhouse with tar over SSH, install it offline into a venv, start a unit."""
    address = state.host(name).address
    key, known_hosts = Path(state.ssh_key), Path(state.known_hosts)
    remote = ssh.ssh_command(key, known_hosts, address,
                             f"rm -rf {BASELINE_DIR} && mkdir -p {BASELINE_DIR}/wheels && "
                             f"tar -x -C {BASELINE_DIR}/wheels")
    with subprocess.Popen(["tar", "-c", "-C", str(wheels), "."], stdout=subprocess.PIPE) as archive:
        subprocess.run(remote, stdin=archive.stdout, check=True, capture_output=True)
    install = (
        f"python3 -m venv {BASELINE_DIR}/venv && "
        f"{BASELINE_DIR}/venv/bin/python -m pip install --quiet --no-index --no-cache-dir "
        f"--disable-pip-version-check --find-links {BASELINE_DIR}/wheels "
        f"--requirement {BASELINE_DIR}/wheels/requirements.lock && "
        f"systemd-run --unit melody-baseline --wait --quiet {BASELINE_DIR}/venv/bin/python -c 'import flwr'"
    )
    result = ssh.run(key, known_hosts, address, install, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"baseline on {name} failed: {result.stderr[-3000:]}")


def baseline(state) -> float:
    wheels = wheelhouse_path()
    names = [host.name for host in state.supernodes]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        list(pool.map(lambda name: baseline_host(state, name, wheels), names))
    # The baseline's files stay until the lab goes down with its overlays.
    return time.monotonic() - started


class MemorySampler(threading.Thread):
    """Samples each lab host's PSS every 2 s and keeps the peak per host."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kib: dict[str, int] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for record in melody_lab.status():
                self.peak_kib[record["name"]] = max(self.peak_kib.get(record["name"], 0), record["memory_kib"])
            self.stopped.wait(2.0)


def federated_run(rounds: int, min_nodes: int) -> tuple[str, dict]:
    env = researcher_env(REPO / ".lab" / "researcher-flwr-home")
    port = free_local_port()
    run([sys.executable, "-m", "melody_deploy.researcher", INVENTORY, "--connection", "lab",
         "--tunnel-port", str(port)], env=env)
    # The Control API is reached only through the researcher's SSH tunnel. A
    # run gets a time limit, so that a lost reply cannot hold the benchmark.
    with control_tunnel(port):
        output = run([str(BIN / "flwr"), "run", "melody_app", "lab", "--stream", "--run-config",
                      f"num-server-rounds={rounds} min-nodes={min_nodes}"], env=env, timeout=900)
        run_id = parse_run_id(output)
        listing = json.loads(run([str(BIN / "flwr"), "ls", "lab", "--run-id", run_id, "--format", "json"], env=env))
    return listing["runs"][0]["status"], parse_result(output)


def small_lab(rows: list[tuple[str, float]]) -> float:
    """Measure on 1 + 2 hosts; return the fresh deploy time of both roles."""
    melody_lab.down()
    state = melody_lab.up(supernodes=2)
    superlink, supernodes = fresh_deploy()
    rows += [("fresh deploy, SuperLink (1 + 2)", superlink), ("fresh deploy, SuperNodes (1 + 2)", supernodes)]

    for role_file, group in (("deploy/superlink.py", "superlink"), ("deploy/supernode.py", "supernodes")):
        noop, _ = timed(deploy, role_file)
        exec_time, _ = timed(exec_true, group)
        rows += [(f"no-op re-deploy, {group}", noop), (f"`exec -- true`, {group}", exec_time)]
        print(f"ratio no-op {group} / exec: {noop / exec_time:.2f}", flush=True)

    baseline_time, _ = timed(baseline, state)
    rows.append(("baseline: tar upload + offline pip install + unit start, 2 SuperNodes", baseline_time))
    print(f"ratio fresh SuperNode deploy / baseline: {supernodes / baseline_time:.2f}", flush=True)
    return superlink + supernodes


def large_lab(rows: list[tuple[str, float]], supernodes: int, rounds: int) -> tuple[dict, dict, str, dict]:
    melody_lab.down()
    up_time, _ = timed(melody_lab.up, supernodes)
    rows.append((f"lab up, 1 + {supernodes}", up_time))
    superlink, nodes = fresh_deploy()
    rows += [(f"fresh deploy, SuperLink (1 + {supernodes})", superlink),
             (f"fresh deploy, SuperNodes (1 + {supernodes})", nodes)]

    time.sleep(10)
    idle = {record["name"]: record["memory_kib"] for record in melody_lab.status()}
    print(f"idle PSS per host (MiB): { {name: kib // 1024 for name, kib in idle.items()} }", flush=True)
    sampler = MemorySampler()
    sampler.start()
    run_time, (status, result) = timed(federated_run, rounds, supernodes)
    sampler.stopped.set()
    sampler.join()
    rows.append((f"federated run, {rounds} round(s), {supernodes} SuperNodes", run_time))
    return idle, sampler.peak_kib, status, result


def main() -> int:
    parser = argparse.ArgumentParser(description="Deploy cost against baselines, and a 1 + N lab.")
    parser.add_argument("--supernodes", type=int, default=16, help="SuperNodes of the large lab (default 16)")
    parser.add_argument("--rounds", type=int, default=1, help="federated rounds on the large lab (default 1)")
    parser.add_argument("--skip-small", action="store_true", help="measure only the large lab")
    args = parser.parse_args()

    rows: list[tuple[str, float]] = []
    small_total = None if args.skip_small else small_lab(rows)
    idle, peak, status, result = large_lab(rows, args.supernodes, args.rounds)
    large_total = sum(seconds for title, seconds in rows if title.startswith("fresh deploy") and f"1 + {args.supernodes}" in title)

    print("\n| step | wall time (s) |\n| --- | ---: |")
    for title, seconds in rows:
        print(f"| {title} | {seconds:.1f} |")
    print("\n| step | CPU seconds (lab hosts and this script's children) |\n| --- | ---: |")
    for name, seconds in CPU_SECONDS.items():
        print(f"| {name} | {seconds:.0f} |")
    if small_total:
        print(f"\nratio fresh deploy 1 + {args.supernodes} / 1 + 2: {large_total / small_total:.2f}")
    print(f"\nrun status: {status}; last round: {json.dumps(result['rounds'][-1])}")
    print("\n| host | idle PSS (MiB) | peak PSS in the run (MiB) |\n| --- | ---: | ---: |")
    for name in idle:
        print(f"| {name} | {idle[name] / 1024:.0f} | {peak.get(name, 0) / 1024:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

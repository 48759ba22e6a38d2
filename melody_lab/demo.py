"""Run the main job on the lab, end to end, and print the results.

    .venv/bin/python -m melody_lab.demo [--supernodes 2] [--rounds 3] [--head-rounds 2]

Brings the lab up (or reuses it), deploys the SuperLink and the SuperNodes
with pyinfra, opens the researcher's SSH tunnel to the Control API, writes
the researcher's `[superlink.lab]` connection, runs
`flwr run melody_app lab` on the shards of the real images, and prints each
round's metrics and how long each step took. The lab stays up afterwards;
`python -m melody_lab down` removes it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from melody_lab.control_tunnel import control_tunnel, lab_tunnel_command

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULT_PREFIX = "MELODY_RESULT "
# flwr 1.42's `flwr run` prints this line once the SuperLink accepted the run.
STARTED_RUN = re.compile(r"Successfully started run (\d+)")

# (step title, wall seconds) of each finished step, printed at the end.
TIMINGS: list[tuple[str, float]] = []


class StepFailed(RuntimeError):
    """A step of the demo exited non-zero."""


def run_step(title: str, command: list[str], env: dict | None = None, capture: bool = False) -> str:
    """Run one step in the repository root, print its wall time, return its output."""
    print(f"\n==> {title}\n    $ {' '.join(command)}", flush=True)
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )
    elapsed = time.monotonic() - started
    if capture:
        sys.stdout.write(result.stdout)
    if result.returncode != 0:
        raise StepFailed(f"{title} failed with exit code {result.returncode} after {elapsed:.0f} s")
    print(f"    {title}: {elapsed:.1f} s", flush=True)
    TIMINGS.append((title, elapsed))
    return result.stdout if capture else ""


def researcher_env(flwr_home: Path) -> dict:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


def parse_run_id(output: str) -> str:
    """Return the id of the run that `flwr run` started."""
    match = STARTED_RUN.search(output)
    if match is None:
        raise StepFailed("`flwr run` printed no run id; see its output above")
    return match.group(1)


def parse_result(output: str) -> dict:
    """Return the app's final MELODY_RESULT record from the run's log."""
    for line in reversed(output.splitlines()):
        position = line.find(RESULT_PREFIX)
        if position >= 0:
            return json.loads(line[position + len(RESULT_PREFIX):])
    raise StepFailed("the run's log has no MELODY_RESULT line; see the log above")


def print_rounds(result: dict) -> None:
    print("\nround  train loss  eval loss  accuracy  balanced accuracy  examples")
    for entry in result["rounds"]:
        # Head rounds retrain only the final layer: mark them so the curve reads right.
        mark = " (head)" if entry.get("head_round") else ""
        print(
            f"{entry['round']:>5}  {entry['train_loss']:>10.4f}  {entry['eval_loss']:>9.4f}"
            f"  {entry['accuracy']:>8.4f}  {entry['balanced_accuracy']:>17.4f}"
            f"  {entry['num_examples']:>8}{mark}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the MELODY main job on the lab.")
    parser.add_argument("--supernodes", type=int, default=2, help="number of SuperNode hosts (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds to train (default 3)")
    parser.add_argument("--head-rounds", type=int, default=2,
                        help="rounds after --rounds that retrain only the final layer (default 2)")
    args = parser.parse_args(argv)

    python = str(BIN / "python")
    pyinfra = str(BIN / "pyinfra")
    flwr = str(BIN / "flwr")
    flwr_home = REPO / ".lab" / "researcher-flwr-home"
    env = researcher_env(flwr_home)

    try:
        run_step("lab up", [python, "-m", "melody_lab", "up", "--supernodes", str(args.supernodes)])
        run_step("deploy SuperLink", [pyinfra, "-y", "inventories/lab.py", "deploy/superlink.py"])
        run_step("deploy SuperNodes", [pyinfra, "-y", "inventories/lab.py", "deploy/supernode.py"])
        # The Control API is reachable only through the researcher's SSH tunnel.
        with control_tunnel() as tunnel_port:
            run_step(
                "researcher connection",
                [python, "-m", "melody_deploy.researcher", "inventories/lab.py", "--connection", "lab",
                 "--tunnel-port", str(tunnel_port)],
                env=env,
            )
            output = run_step(
                "federated run",
                [flwr, "run", "melody_app", "lab", "--stream",
                 "--run-config", f"num-server-rounds={args.rounds} head-rounds={args.head_rounds}"],
                env=env, capture=True,
            )
            run_id = parse_run_id(output)
            listing = run_step(
                "run status", [flwr, "ls", "lab", "--run-id", run_id, "--format", "json"],
                env=env, capture=True,
            )
        # `flwr run --stream` exits 0 even when the run failed, so read its status.
        run = json.loads(listing)["runs"][0]
        if run["status"] != "finished:completed":
            raise StepFailed(f"run {run_id} ended {run['status']}: {run.get('status-details')}")
        result = parse_result(output)
    except (StepFailed, RuntimeError) as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1

    print_rounds(result)
    print(f"\nrun {run_id}: status {run['status']}")
    print("\nwall time per step:")
    for title, elapsed in TIMINGS:
        print(f"  {title:<24} {elapsed:7.1f} s")
    print(
        f"\nThe lab is still up. Researcher config: FLWR_HOME={flwr_home}, which needs the tunnel:\n"
        f"  {' '.join(lab_tunnel_command(tunnel_port))}\n"
        f"Remove the lab with: {python} -m melody_lab down"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real Flower federation on loopback: one SuperLink, two SuperNodes, `flwr run` of melody_app.

Each SuperNode gets its own shard of real DermaMNIST images copied into a temp
folder. All processes bind 127.0.0.1 and use their own FLWR_HOME.
"""

import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

APP_DIR = Path(__file__).resolve().parents[1] / "melody_app"
DERMAMNIST = Path("/work/shared/data/dermamnist28")
BIN_DIR = Path(sys.executable).parent
CONNECTION = "local-test"
RESULT_PREFIX = "MELODY_RESULT "
# Training and test images in each site's shard.
TRAIN_PER_SITE = 600
TEST_PER_SITE = 100
RUN_TIMEOUT_S = 400
ROUNDS = 4
# Rounds after ROUNDS in which the sites retrain only the final layer.
HEAD_ROUNDS = 2
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

pytestmark = pytest.mark.skipif(
    not (DERMAMNIST / "labels.csv").is_file() or not (BIN_DIR / "flower-superlink").is_file(),
    reason=f"needs {DERMAMNIST} and flower-superlink beside {sys.executable}",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_shards(root: Path, num_sites: int) -> list[Path]:
    """Copy disjoint train and test shards of DermaMNIST into one folder per site."""
    with (DERMAMNIST / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    train_rows = [row for row in rows if row["split"] == "train"]
    test_rows = [row for row in rows if row["split"] == "test"]

    sites = []
    for site in range(num_sites):
        shard = (
            train_rows[site * TRAIN_PER_SITE : (site + 1) * TRAIN_PER_SITE]
            + test_rows[site * TEST_PER_SITE : (site + 1) * TEST_PER_SITE]
        )
        folder = root / f"site{site}"
        (folder / "images").mkdir(parents=True)
        with (folder / "labels.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "label", "split"])
            for row in shard:
                shutil.copyfile(DERMAMNIST / row["image"], folder / row["image"])
                writer.writerow([row["image"], row["label"], row["split"]])
        sites.append(folder)
    return sites


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Return an environment with its own FLWR_HOME, no telemetry and no update check.

    The SuperLink and SuperNode start `flower-superexec` from PATH, so the
    venv's bin folder goes first.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def wait_for_health(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"SuperLink exited with code {process.returncode} before it served {url}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Timed out after {timeout_s} s waiting for the SuperLink at {url}")


def live_group_members(pgid: int) -> list[int]:
    """Return the PIDs in process group `pgid` that are not zombies (reads Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp.
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_process_group(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Stop a process started in its own session, and the children it started.

    The SuperLink and SuperNodes start `flower-superexec` and app processes
    that can outlive them by seconds, so the whole group gets SIGTERM, then
    SIGKILL after `timeout_s`.
    """
    pgid = process.pid
    if live_group_members(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    while live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if live_group_members(pgid):
        os.killpg(pgid, signal.SIGKILL)
        process.wait(timeout=timeout_s)


def parse_result(output: str) -> dict:
    lines = [line for line in ANSI_ESCAPE.sub("", output).splitlines() if RESULT_PREFIX in line]
    assert len(lines) == 1, f"expected one {RESULT_PREFIX.strip()} line, found {len(lines)}"
    return json.loads(lines[0].split(RESULT_PREFIX, 1)[1])


@dataclass
class Federation:
    """A running SuperLink with two SuperNodes, and a CLI home that names it CONNECTION."""

    root: Path
    sites: list[Path]
    cli_env: dict[str, str]

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        """Run the flwr CLI against the federation and keep its output in root."""
        completed = subprocess.run(
            [str(BIN_DIR / "flwr"), *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            cwd=self.root,
        )
        name = "-".join(arg for arg in args[:2] if arg.isalnum())
        with (self.root / f"flwr-{name}.log").open("a") as log_file:
            log_file.write(f"$ flwr {' '.join(args)}\n{completed.stdout}{completed.stderr}\n")
        return completed

    def run_status(self, run_id: int) -> dict:
        listing = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        assert listing.returncode == 0, listing.stdout + listing.stderr
        runs = json.loads(listing.stdout)["runs"]
        assert len(runs) == 1
        return runs[0]


def submitted_run_id(output: str) -> int:
    match = re.search(r"Successfully started run (\d+)", ANSI_ESCAPE.sub("", output))
    assert match, "flwr run did not print 'Successfully started run ID'"
    return int(match.group(1))


@pytest.fixture(scope="module")
def federation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Federation]:
    """Start a SuperLink and two SuperNodes on loopback, and stop them after the module.

    Their logs are printed when a test of this module fails.
    """
    root = tmp_path_factory.mktemp("federation")
    sites = write_shards(root / "data", num_sites=2)
    superlink_port = free_port()
    processes: list[subprocess.Popen] = []
    failures_before = request.session.testsfailed

    def start(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        with (root / f"{name}.log").open("wb") as log_file:
            # A session of its own puts the process and its children in one group.
            process = subprocess.Popen(
                command,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=root,
                start_new_session=True,
            )
        processes.append(process)
        return process

    try:
        superlink = start(
            "superlink",
            [
                str(BIN_DIR / "flower-superlink"),
                "--insecure",
                "--database",
                str(root / "state.db"),
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(superlink_port),
            ],
            flower_env(root / "home-superlink"),
        )
        wait_for_health(superlink_port, superlink)

        for partition_id, site in enumerate(sites):
            start(
                f"supernode{partition_id}",
                [
                    str(BIN_DIR / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{superlink_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f'partition-id={partition_id} data-dir="{site}"',
                ],
                flower_env(root / f"home-supernode{partition_id}"),
            )

        cli_env = flower_env(root / "home-cli")
        (root / "home-cli" / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "127.0.0.1:{superlink_port}"\n'
            "insecure = true\n"
        )
        yield Federation(root=root, sites=sites, cli_env=cli_env)
    finally:
        # SuperNodes first, so that they do not retry a SuperLink that is gone.
        for process in reversed(processes):
            stop_process_group(process)
        if request.session.testsfailed > failures_before:
            for path in sorted(root.glob("*.log")):
                print(f"----- {path} -----")
                print(path.read_text(errors="replace"))


def test_short_run_improves_and_saves_artefacts(federation: Federation) -> None:
    started = time.monotonic()
    run = federation.flwr(
        "run", str(APP_DIR), CONNECTION, "--stream", "--run-config",
        f"num-server-rounds={ROUNDS} head-rounds={HEAD_ROUNDS} local-epochs=2 cpu-threads=1",
    )
    print(f"flwr run of {ROUNDS} + {HEAD_ROUNDS} rounds took {time.monotonic() - started:.1f} s")
    assert run.returncode == 0

    run_id = submitted_run_id(run.stdout)
    status = federation.run_status(run_id)
    assert status["status"] == "finished:completed"
    assert status["fab-id"] == "melody/melody-skin-lesion"

    # `flwr log` returns the same result line after the run.
    logged = federation.flwr("log", str(run_id), CONNECTION, "--show")
    assert logged.returncode == 0
    result = parse_result(run.stdout)
    assert parse_result(logged.stdout) == result

    rounds = result["rounds"]
    assert [entry["round"] for entry in rounds] == list(range(1, ROUNDS + HEAD_ROUNDS + 1))
    assert [entry["head_round"] for entry in rounds] == [False] * ROUNDS + [True] * HEAD_ROUNDS
    for entry in rounds:
        for key in ("train_loss", "eval_loss", "accuracy", "balanced_accuracy", "macro_auc"):
            assert isinstance(entry[key], float), f"round {entry['round']} {key}={entry[key]!r}"
            assert math.isfinite(entry[key]), f"round {entry['round']} {key}={entry[key]!r}"
        assert 0.0 <= entry["balanced_accuracy"] <= 1.0
        assert 0.0 <= entry["macro_auc"] <= 1.0
        assert entry["num_examples"] == 2 * TEST_PER_SITE
        assert entry["num_train_examples"] == 2 * TRAIN_PER_SITE
        assert sum(map(sum, entry["confusion"])) == 2 * TEST_PER_SITE
        assert len(entry["sites"]) == 2
    print("balanced accuracy per round:", [round(e["balanced_accuracy"], 3) for e in rounds])
    assert rounds[-1]["balanced_accuracy"] > rounds[0]["balanced_accuracy"]

    # Each site sends about the model's parameter bytes per round.
    for site in rounds[-1]["sites"]:
        assert site["sent_array_bytes"] >= result["model_parameter_bytes"]
        assert site["sent_array_bytes"] < 1.1 * result["model_parameter_bytes"]

    # Each site's device and image count reach the ServerApp log.
    run_log = ANSI_ESCAPE.sub("", run.stdout)
    for partition_id in range(len(federation.sites)):
        pattern = (
            rf"Site partition-id={partition_id} trained on (cpu|cuda) ?.* "
            rf"with {TRAIN_PER_SITE} images"
        )
        assert re.search(pattern, run_log), f"no line matches {pattern!r}"
        assert f"Site partition-id={partition_id} data: layout manifest; train: " \
            f"{TRAIN_PER_SITE} used, 0 skipped" in run_log
    assert f"Rounds {ROUNDS + 1} to {ROUNDS + HEAD_ROUNDS} are head rounds" in run_log

    # The ServerApp saved its artefacts under its working directory and reported the folder.
    folder = federation.root / "melody-runs" / f"run-{run_id}"
    assert result["artefacts"]["folder"] == str(folder)
    assert sorted(path.name for path in folder.iterdir()) == [
        "curves.png", "metrics.json", "model.pt"]
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["rounds"] == rounds

    # The SuperNodes wrote nothing into their data folders; the cache is outside them.
    for site in federation.sites:
        assert sorted(path.name for path in site.iterdir()) == ["images", "labels.csv"]
    assert len(list((federation.root / "melody-cache").iterdir())) >= 2


def test_site_error_fails_run(federation: Federation) -> None:
    # With only two labels, every site's manifest has rows outside the label set.
    run = federation.flwr(
        "run",
        str(APP_DIR),
        CONNECTION,
        "--stream",
        "--run-config",
        'num-server-rounds=1 labels="mel,nv" cpu-threads=1',
    )
    # NOTE: flwr 1.42 `flwr run --stream` exits with 0 for a failed run, so
    # the status comes from `flwr ls`.
    assert run.returncode == 0

    run_id = submitted_run_id(run.stdout)
    status = federation.run_status(run_id)
    assert status["status"] == "finished:failed"
    assert "returned no training or evaluation results" in status["status-details"]

    logged = ANSI_ESCAPE.sub("", federation.flwr("log", str(run_id), CONNECTION, "--show").stdout)
    for partition_id in range(len(federation.sites)):
        assert f"Site partition-id={partition_id}: manifest" in logged
    assert "with a label outside the run's label set mel,nv" in logged
    assert "Relabel these rows" in logged

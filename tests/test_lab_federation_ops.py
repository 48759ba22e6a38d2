"""Operating the federation on the lab: verify, faults during runs, reboots, teardown.

Every test starts from the deployed lab (a no-op deploy when another module
deployed it already) and leaves it deployed and healthy for the next one.
The tests that power-cycle hosts deploy again first, because other modules'
lifecycle tests may have replaced the lab with a fresh one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from melody_lab import lab as melody_lab
from melody_lab import power, ssh
from melody_lab.control_tunnel import control_tunnel, free_local_port
from melody_lab.demo import parse_run_id, researcher_env
from melody_audit.session import EXIT_NOT_REGISTERED
from lab_scripts import unregistered_supernode

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SUPERLINK_UNIT = "melody-superlink.service"
SUPERNODE_UNIT = "melody-supernode.service"
# Seconds within which systemd must bring a killed SuperNode back to active,
# that is restarted and registered again with the SuperLink.
RESTART_LIMIT = 10
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# Local port of the researcher's SSH tunnel to the Control API, one per module.
TUNNEL_PORT = free_local_port()


def pyinfra(inventory: str | Path, deploy: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "pyinfra"), "-y", str(inventory), deploy],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def verify(inventory: str | Path = "inventories/lab.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "melody_deploy.verify", str(inventory)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def on_host(lab, name: str, command: str) -> subprocess.CompletedProcess:
    host = lab.host(name)
    return ssh.run(Path(lab.ssh_key), Path(lab.known_hosts), host.address, command, timeout=120)


def deploy_both() -> None:
    for deploy in ("deploy/superlink.py", "deploy/supernode.py"):
        result = pyinfra("inventories/lab.py", deploy)
        assert result.returncode == 0, f"{deploy} failed:\n{result.stdout[-5000:]}\n{result.stderr[-3000:]}"


def wait_verified(timeout: float = 180) -> subprocess.CompletedProcess:
    """Run verify until it passes or `timeout` seconds have passed; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = verify()
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(5)


def row(output: str, host: str, check: str) -> str:
    """Return the table row of one host and check, or '' when it is missing."""
    for line in output.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] == host and parts[1].startswith(check + " "):
            return line
    return ""


@pytest.fixture(scope="module")
def federation(lab, tmp_path_factory):
    """Deploy both roles and write a researcher connection; yield the lab and the flwr home."""
    deploy_both()
    flwr_home = tmp_path_factory.mktemp("flwr-home")
    configured = subprocess.run(
        [sys.executable, "-m", "melody_deploy.researcher", "inventories/lab.py", "--connection", "lab",
         "--tunnel-port", str(TUNNEL_PORT)],
        cwd=REPO, env=researcher_env(flwr_home), capture_output=True, text=True,
    )
    assert configured.returncode == 0, configured.stderr
    return lab, flwr_home


def flwr(flwr_home: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the researcher's flwr through a fresh SSH tunnel, which restarts and reboots would cut."""
    with control_tunnel(TUNNEL_PORT):
        return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=researcher_env(flwr_home),
                              capture_output=True, text=True, timeout=timeout)


def start_run(flwr_home: Path, rounds: int) -> str:
    """Submit the app without streaming its log and return the run id."""
    started = flwr(flwr_home, "run", "melody_app", "lab", "--run-config",
                   f"num-server-rounds={rounds} head-rounds=0")
    assert started.returncode == 0, started.stdout + started.stderr
    return parse_run_id(started.stdout)


def list_runs(flwr_home: Path) -> dict[str, dict]:
    listing = flwr(flwr_home, "ls", "lab", "--format", "json")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    return {str(run["run-id"]): run for run in json.loads(listing.stdout)["runs"]}


def wait_finished(flwr_home: Path, run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = list_runs(flwr_home)[run_id]
        if run["status"].startswith("finished"):
            return run
        time.sleep(5)
    raise AssertionError(f"run {run_id} did not finish within {timeout:.0f} s: {run}")


def wait_for_clientapp(lab, name: str, timeout: float = 300) -> None:
    """Wait until the host trains, that is until a ClientApp process runs as the service user."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on_host(lab, name, "pgrep -u melody -f flwr-clientapp").returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"{name} started no ClientApp within {timeout:.0f} s")


def remember_pids(lab, state) -> None:
    """Copy the new nspawn PIDs into the session's lab state after a power cycle."""
    for host in state.hosts:
        lab.host(host.name).pid = host.pid


def main_pid(lab, name: str, unit: str) -> str:
    return on_host(lab, name, f"systemctl show --property MainPID --value {unit}").stdout.strip()


def test_verify_passes_on_deployed_lab(federation):
    lab, _ = federation

    result = wait_verified(timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    for name, checks in [("superlink", ["listening", "supernodes online"])] + [
        (host.name, ["connected", "data dir"]) for host in lab.supernodes
    ]:
        for check in ["service active", "service enabled", "flwr version", "disk space", "certificate", *checks]:
            assert " PASS " in row(result.stdout, name, check), f"{name} {check}:\n{result.stdout}"


def test_verify_fails_on_stopped_supernode(federation):
    lab, _ = federation
    target = lab.supernodes[-1].name

    on_host(lab, target, f"systemctl stop {SUPERNODE_UNIT}")
    try:
        result = verify()
    finally:
        on_host(lab, target, f"systemctl start {SUPERNODE_UNIT}")

    assert result.returncode == 1, result.stdout
    assert " FAIL " in row(result.stdout, target, "service active"), result.stdout
    assert " FAIL " in row(result.stdout, target, "connected"), result.stdout
    assert " PASS " in row(result.stdout, lab.supernodes[0].name, "service active"), result.stdout
    assert "checks failed, on" in result.stdout.splitlines()[-1]
    assert target in result.stdout.splitlines()[-1]
    assert wait_verified().returncode == 0


def test_verify_reports_unreachable_host(federation, tmp_path):
    lab, _ = federation
    target = lab.supernodes[-1]
    # Points one SuperNode's SSH at a port where nothing listens, so the
    # connection fails as it does for a host that is down.
    inventory = tmp_path / "unreachable.py"
    inventory.write_text(textwrap.dedent(f"""\
        import runpy
        lab = runpy.run_path({str(REPO / "inventories" / "lab.py")!r})
        superlink = lab["superlink"]
        supernodes = [
            (name, {{**data, "ssh_port": 2}}) if name == {target.name!r} else (name, data)
            for name, data in lab["supernodes"]
        ]
    """))

    result = verify(inventory)

    assert result.returncode == 1, result.stdout
    assert " FAIL " in row(result.stdout, target.name, "ssh"), result.stdout
    assert " PASS " in row(result.stdout, "superlink", "service active"), result.stdout


def journal_times(lab, name: str, since: float, pattern: str) -> list[float]:
    """Return the host clock times (Unix seconds) of the SuperNode's journal lines after `since` that contain `pattern`."""
    lines = on_host(lab, name, f"journalctl --unit {SUPERNODE_UNIT} --since @{since:.3f} --no-pager "
                               f"--output short-unix --grep {pattern!r}").stdout
    return [float(line.split()[0]) for line in lines.splitlines() if line[:1].isdigit()]


def test_supernode_killed_during_run_restarts(federation):
    lab, flwr_home = federation
    target = lab.supernodes[0].name
    run_id = start_run(flwr_home, rounds=1)
    wait_for_clientapp(lab, target)
    killed_pid = main_pid(lab, target, SUPERNODE_UNIT)
    node_id = json.loads(on_host(lab, target, "cat /var/lib/melody-supernode/audit/session.json").stdout)["node_id"]

    # Kill times from the host's clocks: wall time like the journal's, and
    # CLOCK_MONOTONIC like systemd's ActiveEnterTimestampMonotonic.
    killed = on_host(lab, target, "python3 -c 'import time; print(time.time(), time.monotonic())'; "
                                  f"kill -KILL {killed_pid}")
    killed_at, killed_monotonic = (float(value) for value in killed.stdout.split()[:2])
    killed_here = time.monotonic()
    while time.monotonic() - killed_here < 60:
        state = on_host(lab, target, f"systemctl is-active {SUPERNODE_UNIT}").stdout.strip()
        if state == "active" and main_pid(lab, target, SUPERNODE_UNIT) not in ("0", killed_pid):
            break
        time.sleep(0.5)
    active_since = on_host(lab, target, "systemctl show --property ActiveEnterTimestampMonotonic --value "
                                        f"{SUPERNODE_UNIT}").stdout.strip()
    active_after = int(active_since) / 1e6 - killed_monotonic
    reconnected = journal_times(lab, target, killed_at, "registered with SuperLink")
    run = wait_finished(flwr_home, run_id)
    logged = ANSI_ESCAPE.sub("", flwr(flwr_home, "log", run_id, "lab", "--show").stdout)
    print(f"{target}: active {active_after:.1f} s after the kill, registered "
          f"{[f'{moment - killed_at:.1f} s' for moment in reconnected]} after it; run {run}")

    assert active_after <= RESTART_LIMIT, f"{target} was active again only {active_after:.1f} s after the kill"
    assert reconnected, f"{target} logged no new registration after the kill"
    assert reconnected[0] - killed_at <= RESTART_LIMIT
    assert journal_times(lab, target, killed_at, f"closed node {node_id}'s session"), \
        f"{target} did not close the session that the killed process left open"
    assert run["status"] in ("finished:completed", "finished:failed"), run
    if run["status"] == "finished:failed":
        assert run.get("status-details"), f"run {run_id} failed without a reason: {run}"
    else:
        # The round that lost the killed process's work still ended: the ServerApp aggregated it.
        # NOTE: on the lab the log showed no error reply for the killed node's lost instruction.
        # Which replies that round counted is not checked here.
        assert "aggregate_train: Received" in logged, logged[-3000:]
        assert "aggregate_evaluate: Received" in logged, logged[-3000:]
    assert wait_verified().returncode == 0


def test_unregistered_key_exits_not_restarted(federation):
    lab, _ = federation
    name = lab.supernodes[-1].name
    # The launcher with the right CA and a fresh key that was never registered.
    attempt = on_host(lab, name, unregistered_supernode('"$venv/bin/python" -m melody_audit.supernode', audit=True))
    unit = on_host(lab, name, f"systemctl show --property RestartPreventExitStatus --value {SUPERNODE_UNIT}")

    assert attempt.returncode == EXIT_NOT_REGISTERED, attempt.stdout[-3000:]
    assert "rejects this SuperNode's key" in attempt.stdout
    assert "flwr supernode register" in attempt.stdout
    assert str(EXIT_NOT_REGISTERED) in unit.stdout.split()


def test_superlink_restart_keeps_runs(federation):
    lab, flwr_home = federation
    run_id = start_run(flwr_home, rounds=1)
    wait_for_clientapp(lab, lab.supernodes[0].name)
    runs_before = set(list_runs(flwr_home))

    restarted = on_host(lab, "superlink", f"systemctl restart {SUPERLINK_UNIT}")
    assert restarted.returncode == 0, restarted.stderr
    verified = wait_verified()
    runs_after = list_runs(flwr_home)
    run = wait_finished(flwr_home, run_id)

    assert verified.returncode == 0, verified.stdout
    assert runs_before <= set(runs_after), f"runs lost by the restart: {runs_before - set(runs_after)}"
    assert run["status"] in ("finished:completed", "finished:failed"), run
    if run["status"] == "finished:failed":
        assert run.get("status-details"), f"run {run_id} failed without a reason: {run}"


@pytest.mark.lab_lifecycle
def test_unreachable_supernode_spares_other_hosts(federation, tmp_path):
    lab, _ = federation
    deploy_both()
    remember_pids(lab, melody_lab.load_state())
    reachable, unreachable = lab.supernodes[0].name, lab.supernodes[-1].name
    # A changed node config makes the deploy change every SuperNode it reaches.
    inventory = tmp_path / "batch_size.py"
    inventory.write_text(textwrap.dedent(f"""\
        import runpy
        lab = runpy.run_path({str(REPO / "inventories" / "lab.py")!r})
        superlink = lab["superlink"]
        supernodes = [(name, {{**data, "melody_node_config": {{"site-label": name}}}})
                      for name, data in lab["supernodes"]]
    """))

    power.stop([unreachable])
    try:
        result = pyinfra(inventory, "deploy/supernode.py", timeout=600)
        command_line = on_host(lab, reachable, f"systemctl show --property ExecStart --value {SUPERNODE_UNIT}").stdout
    finally:
        remember_pids(lab, power.start([unreachable]))
    restored = pyinfra("inventories/lab.py", "deploy/supernode.py")

    combined = result.stdout + result.stderr
    assert result.returncode != 0, "a deploy with an unreachable host must exit non-zero"
    assert f"[{unreachable}]" in combined and "Could not connect" in combined, combined[-4000:]
    assert f'site-label="{reachable}"' in command_line, combined[-4000:]
    assert restored.returncode == 0, restored.stdout[-4000:]
    assert wait_verified().returncode == 0


@pytest.mark.lab_lifecycle
def test_reboot_brings_every_service_back(federation):
    lab, _ = federation
    deploy_both()
    remember_pids(lab, melody_lab.load_state())
    before = {host.name: host.pid for host in lab.hosts}

    state = power.reboot()
    remember_pids(lab, state)
    result = wait_verified(timeout=180)

    assert all(host.pid != before[host.name] for host in state.hosts), "a host was not power-cycled"
    assert result.returncode == 0, result.stdout


@pytest.mark.lab_lifecycle
def test_teardown_keeps_state_then_redeploys(federation):
    lab, flwr_home = federation
    deploy_both()
    remember_pids(lab, melody_lab.load_state())
    runs_before = set(list_runs(flwr_home))
    data_digest = on_host(lab, lab.supernodes[0].name,
                          f"sha256sum {lab.supernodes[0].data_dir}/labels.csv").stdout

    teardown = pyinfra("inventories/lab.py", "deploy/teardown.py")
    assert teardown.returncode == 0, teardown.stdout[-5000:] + teardown.stderr[-3000:]
    for host in lab.hosts:
        unit = SUPERLINK_UNIT if host.role == "superlink" else SUPERNODE_UNIT
        left = on_host(lab, host.name, f"ls /etc/systemd/system/{unit} /opt/melody 2>&1; getent passwd melody")
        assert "No such file" in left.stdout and "melody:" not in left.stdout, f"{host.name}: {left.stdout}"
    superlink_left = on_host(lab, "superlink", "ls /etc/nginx/conf.d/melody-fleet.conf /etc/melody/tls "
                                               "/etc/systemd/system/melody-superlink-backup.timer 2>&1; "
                                               "getent passwd melody-control")
    assert superlink_left.stdout.count("No such file") == 3, superlink_left.stdout
    assert "melody-control:" not in superlink_left.stdout
    kept = on_host(lab, "superlink", "test -s /var/lib/melody-superlink/state.db && "
                                     "test -s /var/log/melody-superlink/superlink.log")
    assert kept.returncode == 0, "teardown deleted the SuperLink's database or log"
    assert on_host(lab, lab.supernodes[0].name,
                   f"sha256sum {lab.supernodes[0].data_dir}/labels.csv").stdout == data_digest

    deploy_both()
    result = wait_verified()

    assert result.returncode == 0, result.stdout
    assert runs_before <= set(list_runs(flwr_home)), "runs were lost across teardown and re-deploy"

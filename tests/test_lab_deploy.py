"""Both deploys on the lab's real systemd hosts, checked as an operator would.

The tests in this module share one deploy and run in file order: first the
deployed state, then a second deploy that must change nothing, then bad
input that must stop before any host changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from melody_lab import ssh
from melody_lab.control_tunnel import control_tunnel
from melody_lab.demo import parse_result, parse_run_id, researcher_env

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SUPERLINK_UNIT = "melody-superlink.service"
SUPERNODE_UNIT = "melody-supernode.service"


def pyinfra(inventory: str | Path, deploy: str) -> subprocess.CompletedProcess:
    """Run one deploy with the project's pyinfra, as an operator would."""
    return subprocess.run(
        [str(BIN / "pyinfra"), "-y", str(inventory), deploy],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )


def on_host(lab, name: str, command: str) -> subprocess.CompletedProcess:
    host = lab.host(name)
    return ssh.run(Path(lab.ssh_key), Path(lab.known_hosts), host.address, command, timeout=120)


def output_of(lab, name: str, command: str) -> str:
    result = on_host(lab, name, command)
    assert result.returncode == 0, f"{name}: `{command}` failed: {result.stderr}"
    return result.stdout.strip()


def journal(lab, name: str, unit: str) -> str:
    return on_host(lab, name, f"journalctl --unit {unit} --no-pager --lines 60").stdout


def supernode_names(lab) -> list[str]:
    return [host.name for host in lab.supernodes]


def assert_deployed(result: subprocess.CompletedProcess, description: str) -> None:
    assert result.returncode == 0, f"{description} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def deployed(lab):
    """Deploy the SuperLink, then the SuperNodes, once for this module."""
    superlink = pyinfra("inventories/lab.py", "deploy/superlink.py")
    assert_deployed(superlink, "deploy/superlink.py")
    supernode = pyinfra("inventories/lab.py", "deploy/supernode.py")
    if supernode.returncode != 0:
        for name in supernode_names(lab):
            print(f"--- journal of {SUPERNODE_UNIT} on {name}\n{journal(lab, name, SUPERNODE_UNIT)}")
    assert_deployed(supernode, "deploy/supernode.py")
    return lab


def test_superlink_active_enabled_listening(deployed):
    lab = deployed

    active = on_host(lab, "superlink", f"systemctl is-active {SUPERLINK_UNIT}").stdout.strip()
    enabled = on_host(lab, "superlink", f"systemctl is-enabled {SUPERLINK_UNIT}").stdout.strip()
    # The SuperLink listens on loopback; nginx publishes its Fleet API on 8000.
    superlink_listening = on_host(lab, "superlink", "ss -Hltnp 'sport = :8001'").stdout
    front_listening = on_host(lab, "superlink", "ss -Hltnp 'sport = :8000'").stdout

    assert active == "active", journal(lab, "superlink", SUPERLINK_UNIT)
    assert enabled == "enabled"
    assert "127.0.0.1:8001" in superlink_listening
    assert "flower-superlin" in superlink_listening
    assert "0.0.0.0:8000" in front_listening
    assert "nginx" in front_listening


def test_superlink_runs_as_service_user(deployed):
    lab = deployed

    user = output_of(lab, "superlink", f"systemctl show --property User --value {SUPERLINK_UNIT}")
    account = output_of(lab, "superlink", "getent passwd melody")
    owners = output_of(
        lab, "superlink",
        "stat -c '%U %a %n' /var/lib/melody-superlink /var/log/melody-superlink",
    )
    process_user = output_of(
        lab, "superlink",
        f"ps -o user= -p $(systemctl show --property MainPID --value {SUPERLINK_UNIT})",
    )

    assert user == "melody"
    assert account.endswith(":/usr/sbin/nologin")
    assert owners.splitlines() == [
        "melody 750 /var/lib/melody-superlink",
        "melody 750 /var/log/melody-superlink",
    ]
    assert process_user == "melody"


def test_superlink_audit_files_on_disk(deployed):
    lab = deployed

    database = on_host(lab, "superlink", "test -s /var/lib/melody-superlink/state.db")
    log_file = on_host(lab, "superlink", "test -s /var/log/melody-superlink/superlink.log")
    command_line = output_of(lab, "superlink", f"systemctl show --property ExecStart --value {SUPERLINK_UNIT}")

    assert database.returncode == 0, "the SuperLink state database is missing or empty"
    assert log_file.returncode == 0, "the SuperLink log file is missing or empty"
    assert "--database /var/lib/melody-superlink/state.db" in command_line
    assert "--disable-runtime-dependency-installation" in command_line


def test_services_turn_off_calls_out(deployed):
    lab = deployed

    for name, unit in [("superlink", SUPERLINK_UNIT)] + [(n, SUPERNODE_UNIT) for n in supernode_names(lab)]:
        environment = output_of(lab, name, f"systemctl show --property Environment --value {unit}")
        assert "FLWR_TELEMETRY_ENABLED=0" in environment, name
        assert "FLWR_DISABLE_UPDATE_CHECK=1" in environment, name


def test_supernodes_active_and_connected(deployed):
    lab = deployed

    for name in supernode_names(lab):
        status = on_host(lab, name, f"systemctl status --no-pager --lines 0 {SUPERNODE_UNIT}").stdout
        log = journal(lab, name, SUPERNODE_UNIT)
        assert "Active: active (running)" in status, f"{name}:\n{status}\n{log}"
        assert "SuperNode ID:" in log, f"{name} did not connect to the SuperLink:\n{log}"


def test_supernode_node_config_from_inventory(deployed):
    lab = deployed

    for host in lab.supernodes:
        command_line = output_of(lab, host.name, f"systemctl show --property ExecStart --value {SUPERNODE_UNIT}")
        assert "--superlink superlink:8000" in command_line
        assert f"partition-id={host.partition_id}" in command_line
        assert f'data-dir="{host.data_dir}"' in command_line


def main_pids(lab) -> dict[str, str]:
    pids = {"superlink": output_of(lab, "superlink", f"systemctl show --property MainPID --value {SUPERLINK_UNIT}")}
    for name in supernode_names(lab):
        pids[name] = output_of(lab, name, f"systemctl show --property MainPID --value {SUPERNODE_UNIT}")
    return pids


def changed_operation_count(output: str) -> int:
    """Return the Success column of pyinfra's "Grand total" row: operations that changed a host."""
    for line in output.splitlines():
        if line.strip().startswith("Grand total"):
            hosts, success, error, no_change = line.split()[2:6]
            return 0 if success == "-" else int(success)
    raise AssertionError(f"pyinfra printed no results table:\n{output[-3000:]}")


def test_second_deploy_changes_nothing(deployed):
    lab = deployed
    before = main_pids(lab)

    superlink = pyinfra("inventories/lab.py", "deploy/superlink.py")
    supernode = pyinfra("inventories/lab.py", "deploy/supernode.py")

    assert_deployed(superlink, "second deploy/superlink.py")
    assert_deployed(supernode, "second deploy/supernode.py")
    for result in (superlink, supernode):
        combined = result.stdout + result.stderr
        assert changed_operation_count(combined) == 0, combined[combined.find("--> Results"):]
    assert main_pids(lab) == before, "a service was restarted by a deploy that changed nothing"


def run_flwr(args: list[str], flwr_home: Path, timeout: int) -> subprocess.CompletedProcess:
    env = researcher_env(flwr_home)
    return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_federated_run_completes(deployed, tmp_path):
    lab = deployed
    flwr_home = tmp_path / "flwr-home"
    env = dict(os.environ, FLWR_HOME=str(flwr_home))

    with control_tunnel() as tunnel_port:
        configured = subprocess.run(
            [sys.executable, "-m", "melody_deploy.researcher", "inventories/lab.py", "--connection", "lab",
             "--tunnel-port", str(tunnel_port)],
            cwd=REPO, env=env, capture_output=True, text=True,
        )
        assert configured.returncode == 0, configured.stderr
        config = (flwr_home / "config.toml").read_text()
        assert f'address = "127.0.0.1:{tunnel_port}"' in config
        assert f'root-certificates = "{flwr_home / "lab-ca.pem"}"' in config

        # One epoch and one thread per site keep this run short on the shared 2-core
        # machine. One head round checks that phase through the real deployment.
        run = run_flwr(["run", "melody_app", "lab", "--stream", "--run-config",
                        "num-server-rounds=2 head-rounds=1 local-epochs=1 cpu-threads=1"],
                       flwr_home, timeout=900)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        run_id = parse_run_id(run.stdout)
        listing = run_flwr(["ls", "lab", "--run-id", run_id, "--format", "json"], flwr_home, timeout=60)

    runs = json.loads(listing.stdout)["runs"]
    assert len(runs) == 1, listing.stdout
    assert runs[0]["status"] == "finished:completed", runs[0]

    result = parse_result(run.stdout)
    assert [entry["round"] for entry in result["rounds"]] == [1, 2, 3]
    assert [entry["head_round"] for entry in result["rounds"]] == [False, False, True]
    for entry in result["rounds"]:
        assert entry["train_loss"] > 0
        assert 0.0 <= entry["balanced_accuracy"] <= 1.0
    # Both sites evaluated: the examples add up to both shards' test splits.
    shard_test_images = 0
    for host in lab.supernodes:
        count = output_of(lab, host.name, f"grep -c ',test$' {host.data_dir}/labels.csv")
        shard_test_images += int(count)
    assert result["rounds"][-1]["num_examples"] == shard_test_images

    # The ServerApp saved its artefacts in the SuperLink's state directory, and
    # each SuperNode cached decoded images in its own, outside the data folder.
    folder = f"/var/lib/melody-superlink/melody-runs/run-{run_id}"
    assert result["artefacts"]["folder"] == folder
    assert output_of(lab, "superlink", f"ls {folder}").split() == ["curves.png", "metrics.json", "model.pt"]
    for host in lab.supernodes:
        assert output_of(lab, host.name, "ls /var/lib/melody-supernode/melody-cache"), host.name
        assert output_of(lab, host.name, f"find {host.data_dir} -newer {host.data_dir}/labels.csv") == ""


def test_changed_setting_restarts_that_service(deployed, tmp_path):
    lab = deployed
    inventory = write_inventory(tmp_path / "longer_log_retention.py", """\
        superlink = [(name, {**data, "melody_log_backup_count": 30}) for name, data in superlink]
    """)
    before = main_pids(lab)

    changed = pyinfra(inventory, "deploy/superlink.py")
    after = main_pids(lab)
    command_line = output_of(lab, "superlink", f"systemctl show --property ExecStart --value {SUPERLINK_UNIT}")
    restored = pyinfra("inventories/lab.py", "deploy/superlink.py")

    assert_deployed(changed, "deploy/superlink.py with a changed setting")
    assert_deployed(restored, "deploy/superlink.py with the original settings")
    assert "--log-rotation-backup-count 30" in command_line
    assert after["superlink"] != before["superlink"], "the SuperLink was not restarted after its unit changed"
    assert main_pids(lab)["superlink"] != after["superlink"]


def unit_digest(lab, name: str) -> str:
    return output_of(lab, name, f"sha256sum /etc/systemd/system/{SUPERNODE_UNIT}")


def write_inventory(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(f"""\
        import runpy
        lab = runpy.run_path({str(REPO / "inventories" / "lab.py")!r})
        superlink = lab["superlink"]
        supernodes = lab["supernodes"]
    """) + textwrap.dedent(body))
    return path


def test_missing_data_dirs_stop_before_changes(deployed, tmp_path):
    lab = deployed
    names = supernode_names(lab)
    # Every SuperNode gets a data folder that does not exist and a new port,
    # which a deploy that went ahead would apply.
    inventory = write_inventory(tmp_path / "bad_data_dir.py", """\
        supernodes = [
            (name, {**data, "melody_data_dir": f"/srv/melody/missing-{name}", "melody_supernode_port": 9095})
            for name, data in supernodes
        ]
    """)
    before = {name: unit_digest(lab, name) for name in names}
    pids = main_pids(lab)

    result = pyinfra(inventory, "deploy/supernode.py")

    combined = result.stdout + result.stderr
    assert result.returncode != 0
    for name in names:
        assert f"host {name}: setting 'melody_data_dir' = '/srv/melody/missing-{name}' does not exist" in combined
    assert "no host was changed" in combined
    assert {name: unit_digest(lab, name) for name in names} == before
    assert main_pids(lab) == pids


def test_insecure_on_one_host_stops_before_changes(deployed, tmp_path):
    lab = deployed
    inventory = write_inventory(tmp_path / "half_insecure.py", """\
        superlink = [(name, {**data, "melody_insecure": True}) for name, data in superlink]
    """)
    pids = main_pids(lab)

    result = pyinfra(inventory, "deploy/superlink.py")

    combined = result.stdout + result.stderr
    assert result.returncode != 0
    assert "setting 'melody_insecure' is True on superlink only" in combined
    assert main_pids(lab) == pids


def test_unsupported_os_stops_before_changes(deployed, tmp_path):
    lab = deployed
    target = supernode_names(lab)[-1]
    before = unit_digest(lab, target)
    # Pretend this lab host runs an older release, then put it back.
    on_host(lab, target, "cp --remove-destination /usr/lib/os-release /etc/os-release && "
                         "sed -i 's/^VERSION_ID=.*/VERSION_ID=\"10\"/' /etc/os-release")
    try:
        result = pyinfra("inventories/lab.py", "deploy/supernode.py")
    finally:
        on_host(lab, target, "ln -sf ../usr/lib/os-release /etc/os-release")

    combined = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"host {target}: operating system Debian 10 is not supported" in combined
    assert unit_digest(lab, target) == before


def test_partition_id_not_integer_stops_before_changes(deployed, tmp_path):
    lab = deployed
    target = supernode_names(lab)[0]
    inventory = write_inventory(tmp_path / "bad_partition.py", f"""\
        supernodes = [
            (name, {{**data, "melody_partition_id": "first"}}) if name == {target!r} else (name, data)
            for name, data in supernodes
        ]
    """)
    before = unit_digest(lab, target)

    result = pyinfra(inventory, "deploy/supernode.py")

    combined = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"host {target}: setting 'melody_partition_id' = 'first' is a str" in combined
    assert unit_digest(lab, target) == before

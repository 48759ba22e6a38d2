"""flwr versions on the lab: the README's 1.27.0 deployment, the upgrade to 1.42.0, a rollback.

The tests share the session's lab and run in file order. They first tear
the federation down with its state, because a SuperLink database written by
1.42 cannot go back to 1.27. Then they deploy flwr 1.27.0 with the MELODY
README's listeners and run melody_app, upgrade to the lab's own inventory
(1.42.0) and run again. Last, an upgrade to a deliberately broken flwr
1.42.1 must roll back. The lab ends deployed as inventories/lab.py defines it, as
the other lab tests expect.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from flwr_builds import broken_flwr_wheel, researcher_cli, wheelhouse_with
from melody_lab.control_tunnel import control_tunnel
from melody_lab.demo import parse_run_id, researcher_env
from test_lab_deploy import (
    BIN,
    REPO,
    SUPERLINK_UNIT,
    SUPERNODE_UNIT,
    assert_deployed,
    journal,
    on_host,
    output_of,
    pyinfra,
    supernode_names,
    write_inventory,
)

pytestmark = pytest.mark.lab

# flwr 1.27.0 with the MELODY README's flags: SuperLink listeners on 9091
# (ServerAppIo), 9092 (Fleet) and 9093 (Control), a Flower File System
# folder, and the SuperNode's ClientAppIo API on 127.0.0.1:9095.
README_127 = """\
    release = {"melody_flwr_version": "1.27.0"}
    superlink = [(name, {**data, **release, "melody_superlink_port": 9092, "melody_superlink_internal_port": 9093,
                         "melody_superlink_serverappio_port": 9091,
                         "melody_superlink_storage_dir": "/var/lib/melody-superlink/ffs"})
                 for name, data in superlink]
    supernodes = [(name, {**data, **release, "melody_supernode_port": 9095}) for name, data in supernodes]
"""
RUN_CONFIG = "num-server-rounds=2 head-rounds=0 local-epochs=1 cpu-threads=1"


def deploy_both(inventory, description: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    superlink = pyinfra(inventory, "deploy/superlink.py")
    assert_deployed(superlink, f"{description}: deploy/superlink.py")
    supernode = pyinfra(inventory, "deploy/supernode.py")
    assert_deployed(supernode, f"{description}: deploy/supernode.py")
    return superlink, supernode


def unit_venv(lab, name: str, unit: str) -> str:
    exec_start = output_of(lab, name, f"grep -m1 '^ExecStart=' /etc/systemd/system/{unit}")
    return exec_start.removeprefix("ExecStart=").split()[0].rsplit("/bin/", 1)[0]


def configure_researcher(inventory: Path, flwr_home: Path, port: int) -> None:
    """Write the researcher's Flower connection "lab" through the tunnel on local `port`."""
    configured = subprocess.run(
        [str(BIN / "python"), "-m", "melody_deploy.researcher", str(inventory), "--connection", "lab",
         "--tunnel-port", str(port)],
        cwd=REPO, env=researcher_env(flwr_home), capture_output=True, text=True,
    )
    assert configured.returncode == 0, configured.stderr


def run_app(flwr: Path, inventory: Path, flwr_home: Path) -> tuple[str, list[dict]]:
    """Submit melody_app for 2 short rounds through the researcher's tunnel; return its run id and all runs."""
    with control_tunnel(inventory=inventory) as port:
        configure_researcher(inventory, flwr_home, port)
        run = subprocess.run([str(flwr), "run", "melody_app", "lab", "--stream", "--run-config", RUN_CONFIG],
                             cwd=REPO, env=researcher_env(flwr_home), capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        run_id = parse_run_id(run.stdout)
        runs = list_runs(flwr, flwr_home)
    return run_id, runs


def list_runs(flwr: Path, flwr_home: Path) -> list[dict]:
    listing = subprocess.run([str(flwr), "ls", "lab", "--format", "json"], cwd=REPO, env=researcher_env(flwr_home),
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    return json.loads(listing.stdout)["runs"]


def status_of(runs: list[dict], run_id: str) -> str:
    return next(run["status"] for run in runs if str(run["run-id"]) == run_id)


@pytest.fixture(scope="module")
def versions(lab, tmp_path_factory):
    """Tear the lab's federation down with its state; return what the tests pass on."""
    folder = tmp_path_factory.mktemp("versions")
    purge = write_inventory(folder / "purge.py", """\
        superlink = [(name, {**data, "melody_teardown_purge": True}) for name, data in superlink]
        supernodes = [(name, {**data, "melody_teardown_purge": True}) for name, data in supernodes]
    """)
    assert_deployed(pyinfra(purge, "deploy/teardown.py"), "deploy/teardown.py with melody_teardown_purge")
    return {"lab": lab, "folder": folder, "readme": write_inventory(folder / "readme_127.py", README_127)}


def test_storage_dir_on_142_stops_before_changes(versions):
    lab = versions["lab"]
    inventory = write_inventory(versions["folder"] / "storage_142.py", """\
        superlink = [(name, {**data, "melody_superlink_storage_dir": "/var/lib/melody-superlink/ffs"})
                     for name, data in superlink]
    """)

    result = pyinfra(inventory, "deploy/superlink.py")

    combined = result.stdout + result.stderr
    assert result.returncode != 0
    assert "setting 'melody_superlink_storage_dir' needs flower-superlink --storage-dir" in combined
    assert "flwr 1.42.0 does not accept" in combined
    assert "no host was changed" in combined
    assert on_host(lab, "superlink", f"test -e /etc/systemd/system/{SUPERLINK_UNIT}").returncode != 0


def test_127_readme_listeners(versions):
    lab = versions["lab"]
    deploy_both(versions["readme"], "flwr 1.27.0")

    listening = output_of(lab, "superlink", "ss -Hltn")
    supernode_listening = {name: output_of(lab, name, "ss -Hltn") for name in supernode_names(lab)}
    command_line = output_of(lab, "superlink", f"systemctl show --property ExecStart --value {SUPERLINK_UNIT}")

    # gRPC prints an IPv4 loopback listener as [::ffff:127.0.0.1] and a wildcard one as *.
    assert re.search(r"\s(\[::ffff:)?127\.0\.0\.1\]?:9091\s", listening), listening
    assert re.search(r"\s(\*|0\.0\.0\.0):9092\s", listening), listening
    assert re.search(r"\s(\[::ffff:)?127\.0\.0\.1\]?:9093\s", listening), listening
    assert ":8000 " not in listening
    assert "--storage-dir /var/lib/melody-superlink/ffs" in command_line
    assert "--enable-supernode-auth" in command_line
    # The Fleet listener is the SuperLink's own, so no nginx front is installed.
    assert on_host(lab, "superlink", "test -e /etc/nginx/conf.d/melody-fleet.conf").returncode != 0
    for name, sockets in supernode_listening.items():
        assert re.search(r"\s(\[::ffff:)?127\.0\.0\.1\]?:9095\s", sockets), f"{name}: {sockets}"
        assert "registered with SuperLink" in journal(lab, name, SUPERNODE_UNIT), name


def test_127_run_completes_with_egress_record(versions):
    lab = versions["lab"]
    flwr = researcher_cli("1.27.0")

    run_id, runs = run_app(flwr, versions["readme"], versions["folder"] / "flwr-home-127")

    assert status_of(runs, run_id) == "finished:completed"
    versions["run_127"] = run_id
    # The audit launcher wraps flwr 1.27's Fleet connection too: each site recorded its replies.
    for name in supernode_names(lab):
        lines = output_of(lab, name, "cat /var/lib/melody-supernode/audit/egress.jsonl").splitlines()
        records = [json.loads(line) for line in lines]
        sent = [record for record in records if str(record["run_id"]) == run_id]
        assert sent, f"{name}: no egress record for run {run_id}"
        assert all(record["status"] == "sent" and record["payload_bytes"] > 0 for record in sent), sent


def test_upgrade_to_142_keeps_earlier_run(versions):
    lab = versions["lab"]
    old_venv = unit_venv(lab, "superlink", SUPERLINK_UNIT)

    superlink, supernode = deploy_both("inventories/lab.py", "upgrade to flwr 1.42.0")

    new_venv = unit_venv(lab, "superlink", SUPERLINK_UNIT)
    assert "flwr-1.27.0-" in old_venv
    assert "flwr-1.42.0-" in new_venv
    assert ("after a copy of /var/lib/melody-superlink/state.db to /var/backups/melody-superlink/pre-upgrade/"
            in superlink.stderr)
    assert output_of(lab, "superlink", "ls /var/backups/melody-superlink/pre-upgrade/").endswith(
        "-before-flwr-1.42.0.db")
    # The rollback target stays installed beside the venv in use.
    assert output_of(lab, "superlink", f"test -d {old_venv} && echo kept") == "kept"
    for name in supernode_names(lab):
        assert "flwr-1.42.0-" in unit_venv(lab, name, SUPERNODE_UNIT), name

    run_id, runs = run_app(BIN / "flwr", REPO / "inventories" / "lab.py", versions["folder"] / "flwr-home-142")

    assert status_of(runs, versions["run_127"]) == "finished:completed"
    assert status_of(runs, run_id) == "finished:completed"
    versions["runs_after_upgrade"] = len(runs)


def test_broken_upgrade_rolls_back(versions):
    lab = versions["lab"]
    folder = versions["folder"] / "broken-wheels"
    folder.mkdir()
    source = next(wheelhouse_with("1.42.0").glob("flwr-1.42.0-*.whl"))
    broken_flwr_wheel(source, "1.42.1", folder)
    inventory = write_inventory(versions["folder"] / "broken_142_1.py", f"""\
        superlink = [(name, {{**data, "melody_flwr_version": "1.42.1",
                              "melody_pip_download_args": ["--find-links", {str(folder)!r}]}})
                     for name, data in superlink]
    """)
    venv_before = unit_venv(lab, "superlink", SUPERLINK_UNIT)

    result = pyinfra(inventory, "deploy/superlink.py")

    combined = result.stdout + result.stderr
    assert result.returncode != 0, "the deploy of a SuperLink that cannot start succeeded"
    assert "deliberately broken flwr build" in combined
    assert "ROLLBACK done" in combined
    assert unit_venv(lab, "superlink", SUPERLINK_UNIT) == venv_before
    assert output_of(lab, "superlink", f"systemctl is-active {SUPERLINK_UNIT}") == "active"
    runs = list_runs_through_tunnel(versions)
    assert len(runs) == versions["runs_after_upgrade"]
    # The default deploy now finds its own unit in place and changes nothing on the SuperLink service.
    again = pyinfra("inventories/lab.py", "deploy/superlink.py")
    assert_deployed(again, "deploy/superlink.py after the rollback")
    assert "is switched from" not in again.stdout


def list_runs_through_tunnel(versions) -> list[dict]:
    flwr_home = versions["folder"] / "flwr-home-142"
    inventory = REPO / "inventories" / "lab.py"
    with control_tunnel(inventory=inventory) as port:
        configure_researcher(inventory, flwr_home, port)
        return list_runs(BIN / "flwr", flwr_home)

"""The audit trail on the lab: egress records, the status line, backups and the report.

The module deploys both roles (a no-op when another module has already),
runs one federated round, and then checks the report an operator gets, as
the tests below run in file order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from melody_lab.control_tunnel import control_tunnel
from melody_lab.demo import parse_run_id
from test_lab_deploy import assert_deployed, on_host, output_of, pyinfra, run_flwr

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
SUPERNODE_UNIT = "melody-supernode.service"
EGRESS_FILE = "/var/lib/melody-supernode/audit/egress.jsonl"


def audit_report(out: Path, since: str | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "melody_deploy.audit", "inventories/lab.py", "--out", str(out)]
    if since:
        args += ["--since", since]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


def read_report(out: Path) -> dict:
    return json.loads((out / "audit-report.json").read_text())


def journal_bytes(lab, name: str, run_id: str) -> int:
    """Sum the payload bytes of the run's egress records in the host's journal."""
    fields = output_of(
        lab, name,
        f"journalctl SYSLOG_IDENTIFIER=melody-egress MELODY_RUN_ID={run_id} --no-pager "
        f"--output cat --output-fields MELODY_PAYLOAD_BYTES",
    )
    return sum(int(line) for line in fields.split())


@pytest.fixture(scope="module")
def audited_run(lab, tmp_path_factory):
    """Deploy both roles, run one federated round, and return the run id."""
    assert_deployed(pyinfra("inventories/lab.py", "deploy/superlink.py"), "deploy/superlink.py")
    assert_deployed(pyinfra("inventories/lab.py", "deploy/supernode.py"), "deploy/supernode.py")

    flwr_home = tmp_path_factory.mktemp("flwr-home")
    env = dict(os.environ, FLWR_HOME=str(flwr_home))
    # The Control API is reachable only through the researcher's SSH tunnel.
    with control_tunnel() as tunnel_port:
        configured = subprocess.run(
            [sys.executable, "-m", "melody_deploy.researcher", "inventories/lab.py", "--connection", "lab",
             "--tunnel-port", str(tunnel_port)],
            cwd=REPO, env=env, capture_output=True, text=True,
        )
        assert configured.returncode == 0, configured.stderr
        run = run_flwr(["run", "melody_app", "lab", "--stream", "--run-config",
                        "num-server-rounds=1 head-rounds=0"],
                       flwr_home, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    return lab, parse_run_id(run.stdout)


def test_status_line_shows_connection_and_run(audited_run):
    lab, run_id = audited_run

    for host in lab.supernodes:
        status = output_of(lab, host.name, f"systemctl status --no-pager --lines 0 {SUPERNODE_UNIT}")
        unit_type = output_of(lab, host.name, f"systemctl show --property Type --value {SUPERNODE_UNIT}")
        assert unit_type == "notify"
        assert 'Status: "SuperLink superlink:8000: connected as node ' in status, status
        assert f"last run: {run_id} at " in status, status


def test_report_lists_run_and_both_sites(audited_run, tmp_path):
    lab, run_id = audited_run

    result = audit_report(tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    report = read_report(tmp_path)
    runs = {run["run_id"]: run for run in report["runs"]}
    assert run_id in runs, report["runs"]
    run = runs[run_id]
    assert run["status"] == "finished:completed"
    assert len(run["app_bundle_sha256"]) == 64
    assert sorted(run["sites"]) == sorted(host.name for host in lab.supernodes)
    for host in lab.supernodes:
        sent = run["sites"][host.name]
        assert sent["by_type"] == {"train": 1, "evaluate": 1}
        assert sent["failed_messages"] == 0
        assert sent["payload_bytes"] == journal_bytes(lab, host.name, run_id)
        assert report["verification"][host.name]["ok"]
    assert f"| {run_id} |" in (tmp_path / "audit-report.md").read_text()


def test_egress_record_has_round_and_no_content(audited_run):
    lab, run_id = audited_run

    lines = output_of(lab, lab.supernodes[0].name, f"grep -F '\"run_id\": {run_id},' {EGRESS_FILE}").splitlines()
    records = [json.loads(line) for line in lines]

    assert [record["round"] for record in records] == ["1", "1"]
    assert {record["message_type"] for record in records} == {"train", "evaluate"}
    assert all(len(record["payload_sha256"]) == 64 for record in records)
    assert set(records[0]) == {
        "seq", "time", "run_id", "message_type", "round", "message_id", "reply_to", "node_id",
        "destination", "payload_bytes", "payload_sha256", "objects_pushed",
        "objects_already_on_superlink", "status", "error", "prev_hash", "hash",
    }


def tamper_and_report(lab, name: str, script: str, out: Path) -> subprocess.CompletedProcess:
    """Change the site's egress file with `script`, run the report, then put the file back."""
    on_host(lab, name, f"cp -p {EGRESS_FILE} {EGRESS_FILE}.saved")
    try:
        changed = on_host(lab, name, script)
        assert changed.returncode == 0, changed.stderr
        return audit_report(out)
    finally:
        on_host(lab, name, f"mv {EGRESS_FILE}.saved {EGRESS_FILE}")


def test_edited_egress_line_fails_verification(audited_run, tmp_path):
    lab, _ = audited_run
    name = lab.supernodes[0].name

    result = tamper_and_report(lab, name, f"sed -i '1s/\"payload_bytes\": [0-9]*/\"payload_bytes\": 1/' {EGRESS_FILE}",
                               tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{name} egress file line 1: record was edited" in result.stderr
    assert not read_report(tmp_path)["verification"][name]["ok"]


def test_deleted_egress_line_fails_verification(audited_run, tmp_path):
    lab, _ = audited_run
    name = lab.supernodes[1].name

    # A one-round run leaves two records per site, so the first is deleted:
    # the last one has no successor whose link would break.
    result = tamper_and_report(lab, name, f"sed -i '1d' {EGRESS_FILE}", tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{name} egress file line 1: prev_hash does not match" in result.stderr
    assert "is missing from the file" in result.stderr


def test_database_backup_holds_run(audited_run):
    lab, run_id = audited_run

    # flwr's SQLite state stores the unsigned 64-bit run id as a signed integer.
    stored_id = int(run_id) - 2**64 if int(run_id) >= 2**63 else int(run_id)

    started = on_host(lab, "superlink", "systemctl start melody-superlink-backup.service")
    newest = output_of(lab, "superlink", "ls /var/backups/melody-superlink/ | tail -n 1")
    runs = output_of(
        lab, "superlink",
        f"python3 -c \"import sqlite3; print(sqlite3.connect('/var/backups/melody-superlink/{newest}')"
        f".execute('SELECT count(*) FROM run WHERE run_id = {stored_id}').fetchone()[0])\"",
    )
    timer = output_of(lab, "superlink", "systemctl is-active melody-superlink-backup.timer")

    assert started.returncode == 0, started.stderr
    assert runs == "1"
    assert timer == "active"


def test_supernode_restart_in_report(audited_run, tmp_path):
    lab, _ = audited_run
    name = lab.supernodes[1].name
    since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    restarted = on_host(lab, name, f"systemctl restart {SUPERNODE_UNIT}")
    result = audit_report(tmp_path, since=since)

    assert restarted.returncode == 0, restarted.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    events = [event["event"] for event in read_report(tmp_path)["services"][name]["events"]]
    assert "stopped" in events
    assert "started" in events
    assert f"{name}: started: Started melody-supernode.service" in (tmp_path / "audit-report.md").read_text()


def test_killed_supernode_restarted_by_systemd(audited_run, tmp_path):
    lab, _ = audited_run
    name = lab.supernodes[0].name
    since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    restarts_before = int(output_of(lab, name, f"systemctl show --property NRestarts --value {SUPERNODE_UNIT}"))

    # The launcher runs flwr in its own process, so a killed SuperNode is a
    # failed main process that Restart=on-failure must bring back.
    on_host(lab, name, f"systemctl kill --signal SIGKILL {SUPERNODE_UNIT}")
    back = on_host(lab, name, f"for attempt in $(seq 90); do "
                              f"test $(systemctl show --property NRestarts --value {SUPERNODE_UNIT}) -gt {restarts_before} "
                              f"&& systemctl is-active --quiet {SUPERNODE_UNIT} && exit 0; sleep 1; done; exit 1")
    result = audit_report(tmp_path, since=since)

    assert back.returncode == 0, output_of(lab, name, f"journalctl --unit {SUPERNODE_UNIT} --no-pager --lines 30")
    assert result.returncode == 0, result.stdout + result.stderr
    service = read_report(tmp_path)["services"][name]
    events = [event["event"] for event in service["events"]]
    assert "restart scheduled" in events
    assert "started" in events
    # With SuperNode authentication the SuperLink rejects the first restart
    # while it still counts the killed node as online, so systemd may need two.
    restarts_after = int(output_of(lab, name, f"systemctl show --property NRestarts --value {SUPERNODE_UNIT}"))
    assert restarts_after > restarts_before
    assert int(service["restarts_by_systemd"]) == restarts_after

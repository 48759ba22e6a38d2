"""Gather one host's audit records and print them as JSON (standard library only).

The audit report sends this file over SSH to the host's own `python3` and
runs it as root:

    python3 - '{"role": "supernode", "since": "2026-01-01 00:00:00", ...}' < collect.py

It only reads: unit properties, the journal, the egress file, the installed
venv's package list and (on the SuperLink) the state database, opened
read-only. Verification happens on the operator's machine.
"""

import glob
import json
import os
import socket
import sqlite3
import subprocess
import sys

# systemd's catalog ids of the unit lifecycle messages in the journal.
LIFECYCLE_MESSAGES = {
    "39f53479d3a045ac8e11786248231fbf": "started",
    "9d1aaa27d60140bd96365438aad20286": "stopped",
    "d9b373ed55a64feb8242e02dbe79a49c": "failed",
    "98e322203f7a4ed290d09fe03c09fe15": "process exited",
    "5eb03494b6584870a536b337290809b3": "restart scheduled",
}
UNIT_PROPERTIES = (
    "ActiveState", "SubState", "NRestarts", "ExecMainStartTimestamp", "ExecMainStatus",
    "StatusText", "Type", "FragmentPath",
)
RUN_QUERY = """
SELECT run.run_id, run.fab_id, run.fab_version, run.fab_hash, run.flwr_aid,
       run.bytes_sent, run.bytes_recv, task.pending_at, task.starting_at,
       task.running_at, task.finished_at, task.sub_status, task.details
FROM run LEFT JOIN task ON task.task_id = run.primary_task_id
ORDER BY task.pending_at
"""
INTEGER_FIELDS = ("seq", "run_id", "node_id", "payload_bytes", "objects_pushed", "objects_already_on_superlink")


def command_output(args):
    result = subprocess.run(args, capture_output=True, text=True)
    return result.stdout


def journal_entries(args):
    entries = []
    for line in command_output(["journalctl", "--no-pager", "--output", "json", *args]).splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def unit_state(unit):
    output = command_output(["systemctl", "show", unit, *[f"--property={name}" for name in UNIT_PROPERTIES]])
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def unit_events(unit, since):
    events = []
    for entry in journal_entries(["--unit", unit, "--since", since]):
        kind = LIFECYCLE_MESSAGES.get(entry.get("MESSAGE_ID", ""))
        if kind is None or entry.get("_PID") != "1":
            continue
        events.append({
            "time_us": int(entry["__REALTIME_TIMESTAMP"]),
            "unit": unit,
            "event": kind,
            "message": entry.get("MESSAGE", ""),
        })
    return events


def venv_versions(unit):
    """Return the venv of the unit's ExecStart and its installed distributions."""
    exec_start = command_output(["systemctl", "show", unit, "--property=ExecStart", "--value"])
    for word in exec_start.replace(";", " ").split():
        if "/venvs/" in word and "/bin/" in word:
            venv = word.split("/bin/")[0].replace("path=", "")
            break
    else:
        return {"venv": None, "packages": {}}
    packages = {}
    for folder in glob.glob(f"{venv}/lib/python*/site-packages/*.dist-info"):
        name, _, version = os.path.basename(folder)[: -len(".dist-info")].rpartition("-")
        packages[name.lower().replace("_", "-")] = version
    return {"venv": venv, "packages": packages}


def egress_journal():
    records = []
    for entry in journal_entries(["SYSLOG_IDENTIFIER=melody-egress"]):
        record = {key[len("MELODY_"):].lower(): value for key, value in entry.items() if key.startswith("MELODY_")}
        for key in INTEGER_FIELDS:
            if key in record:
                record[key] = int(record[key])
        records.append(record)
    return records


def superlink_runs(database):
    try:
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        connection.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in connection.execute(RUN_QUERY)], None
        finally:
            connection.close()
    except sqlite3.Error as error:
        return [], f"reading {database} failed: {error}"


def main():
    request = json.loads(sys.argv[1])
    unit = request["unit"]
    report = {
        "hostname": socket.gethostname(),
        "role": request["role"],
        "unit": unit_state(unit),
        "events": unit_events(unit, request["since"]),
        "versions": venv_versions(unit),
    }
    if request["role"] == "supernode":
        path = request["egress_file"]
        report["egress_lines"] = open(path).read().splitlines() if os.path.exists(path) else []
        report["egress_file_exists"] = os.path.exists(path)
        report["egress_journal"] = egress_journal()
    else:
        report["runs"], report["runs_error"] = superlink_runs(request["database"])
        report["backup_timer"] = unit_state("melody-superlink-backup.timer")
        report["backups"] = sorted(os.path.basename(path) for path in glob.glob(f"{request['backup_dir']}/state-*.db"))
    json.dump(report, sys.stdout, default=str)


if __name__ == "__main__":
    main()

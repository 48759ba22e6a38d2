"""Switch a service to a new venv (a flwr upgrade or downgrade), with automatic rollback.

Each venv is named after its flwr version and wheelhouse, so a new version
installs beside the one in use. When the unit on the host runs another venv
than the one just installed, the switch runs as one script on the host:

1. save the current unit, stop the service, and copy the SuperLink's state
   database (newer releases migrate its schema on start);
2. install the new unit, start it, and run the role's health check;
3. on failure, stop it, put back the saved unit and the database copy, start
   the previous service again, and exit non-zero with what happened;
4. on success, record the venv in the unit's history and delete venvs that
   `melody_venv_retire_after` upgrades have passed, never the one in use or
   the rollback target.

A deploy whose unit already runs the installed venv keeps the ordinary path:
upload the unit, restart it only when something changed.
"""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.operations import files, server

from .plan import HostPlan
from .service import install_unit, journal_on_failure, run_service
from .units import UNIT_DIR

# Seconds a new service may run before the switch counts it as started; a
# start that systemd restarts within them fails the switch at once.
RESTART_WATCH = 90
HISTORY_PREFIX = ".melody-history-"


class UnitVenv(FactBase):
    """
    The venv whose programs the installed unit's ExecStart runs, or None.

    .. code:: python

        "/opt/melody/venvs/flwr-1.27.0-0123456789ab"
    """

    def command(self, unit: str) -> str:
        return (f"sed -n 's|^ExecStart=\\(/[^ ]*\\)/bin/[^ ]*.*|\\1|p' {UNIT_DIR}/{unit} 2>/dev/null | head -n 1 "
                f"|| true")

    def process(self, output):
        text = "".join(output).strip()
        return text or None


def upgrade_dir(settings: dict) -> str:
    return f"{settings['melody_install_dir']}/upgrade"


def history_file(settings: dict, unit: str) -> str:
    return f"{settings['melody_install_dir']}/venvs/{HISTORY_PREFIX}{unit}"


def retire_script(settings: dict, unit: str, previous: str, current: str) -> str:
    """Python run on the host: record `current` in the unit's history, delete retired venvs.

    A venv is retired once `melody_venv_retire_after` switches have happened
    since it was last in use. The venv in use, the rollback target
    `previous`, and any venv another melody unit runs are always kept. The
    wheelhouse of a deleted venv is deleted with it.
    """
    install_dir = settings["melody_install_dir"]
    keep_last = settings["melody_venv_retire_after"]
    return f"""
import glob, os, pathlib, shutil
history_path = pathlib.Path({history_file(settings, unit)!r})
history = history_path.read_text().split() if history_path.exists() else []
if not history:
    history = [{previous!r}]
history.append({current!r})
history_path.write_text("\\n".join(history) + "\\n")
keep = set(history[-{keep_last}:]) | {{{previous!r}, {current!r}}}
for other_unit in glob.glob({UNIT_DIR!r} + "/melody-*.service"):
    for line in pathlib.Path(other_unit).read_text().splitlines():
        if line.startswith("ExecStart=/"):
            keep.add(line.split()[0][len("ExecStart="):].rsplit("/bin/", 1)[0])
for venv in sorted(set(history) - keep):
    if not os.path.isdir(venv):
        continue
    shutil.rmtree(venv)
    wheelhouse_id = venv.rsplit("-", 1)[-1]
    still_used = [path for path in keep if path.endswith("-" + wheelhouse_id)]
    if not still_used:
        shutil.rmtree({install_dir!r} + "/wheelhouses/" + wheelhouse_id, ignore_errors=True)
    print(f"retired venv {{venv}}: {keep_last} upgrades since it was last in use")
"""


def switch_script(plan: HostPlan, unit: str, previous: str, check_script: str, database: str | None) -> str:
    """Bash script that switches `unit` to the staged unit file, or rolls back."""
    settings = plan.settings
    staging = upgrade_dir(settings)
    unit_path = f"{UNIT_DIR}/{unit}"
    version = settings["melody_flwr_version"]
    backup = ""
    if database is not None:
        backup = f"{settings['melody_superlink_backup_dir']}/pre-upgrade"
    retire = retire_script(settings, unit, previous, plan.paths.venv)
    lines = [
        "set -u",
        f"unit={unit}",
        "check_log=$(mktemp)",
        "trap 'rm -f \"$check_log\"' EXIT",
        f"saved={staging}/{unit}.previous",
        f"cp -p {unit_path} \"$saved\"",
        f"echo \"switching $unit from {previous} to {plan.paths.venv} (flwr {version})\"",
        "systemctl stop \"$unit\"",
        # A copy of the stopped database is consistent, WAL files included.
        "database_copy=''",
    ]
    if database is not None:
        lines += [
            f"if [ -f {database} ]; then",
            f"  install -d -m 0700 -o root -g root {backup}",
            f"  database_copy={backup}/state-$(date -u +%Y%m%dT%H%M%SZ)-before-flwr-{version}.db",
            f"  cp -p {database} \"$database_copy\"",
            f"  for suffix in -wal -shm; do [ -f {database}$suffix ] && cp -p {database}$suffix \"$database_copy$suffix\"; done",
            "  echo \"state database backed up to $database_copy\"",
            "fi",
        ]
    lines += [
        f"install -m 0644 -o root -g root {staging}/{unit}.new {unit_path}",
        "systemctl daemon-reload",
        "systemctl reset-failed \"$unit\" 2>/dev/null",
        # A notify service's start waits for readiness; its failure is judged below.
        "systemctl enable --quiet \"$unit\"",
        "systemctl start \"$unit\" || true",
        "healthy() {",
        f"  ( {check_script} ) >\"$check_log\" 2>&1 &",
        "  check=$!",
        "  restarts_before=$(systemctl show --property NRestarts --value \"$unit\")",
        f"  for second in $(seq {RESTART_WATCH}); do",
        "    if ! kill -0 \"$check\" 2>/dev/null; then wait \"$check\"; return $?; fi",
        "    restarts=$(systemctl show --property NRestarts --value \"$unit\")",
        "    if [ \"${restarts:-0}\" -gt \"${restarts_before:-0}\" ] || systemctl is-failed --quiet \"$unit\"; then",
        "      kill \"$check\" 2>/dev/null; wait \"$check\" 2>/dev/null",
        "      echo \"$unit failed and was restarted by systemd ($restarts restarts)\" >&2; return 1",
        "    fi",
        "    sleep 1",
        "  done",
        "  wait \"$check\"",
        "}",
        "if healthy; then",
        f"  echo \"$unit runs flwr {version} from {plan.paths.venv}\"",
        f"  python3 -c {shlex.quote(retire)}",
        "  rm -f \"$saved\"",
        "  exit 0",
        "fi",
        "cat \"$check_log\" >&2",
        journal_on_failure(unit),
        f"echo \"ROLLBACK: $unit did not start healthy on flwr {version}; restoring {previous}, its unit\""
        " \"${database_copy:+and the database copy $database_copy}\" >&2",
        "systemctl stop \"$unit\"",
        f"cp -p \"$saved\" {unit_path}",
    ]
    if database is not None:
        lines += [
            "if [ -n \"$database_copy\" ]; then",
            f"  cp -p \"$database_copy\" {database}",
            f"  for suffix in -wal -shm; do rm -f {database}$suffix; "
            f"[ -f \"$database_copy$suffix\" ] && cp -p \"$database_copy$suffix\" {database}$suffix; done",
            "fi",
        ]
    lines += [
        "systemctl daemon-reload",
        "systemctl reset-failed \"$unit\" 2>/dev/null",
        "systemctl start \"$unit\" || true",
        "if healthy; then",
        f"  echo \"ROLLBACK done: $unit runs {previous} again; the flwr {version} venv stays for inspection\" >&2",
        "  exit 1",
        "fi",
        "cat \"$check_log\" >&2",
        f"echo \"ROLLBACK FAILED: $unit does not start on {previous} either; the saved unit is $saved\" >&2",
        "exit 2",
    ]
    return "\n".join(lines)


@deploy("Service on its venv")
def switch_service(plan: HostPlan, unit: str, content: str, changes: list, check_script: str,
                   database: str | None = None) -> None:
    """Install and run `unit`, switching venvs with backup and rollback when the venv changes.

    `database`: the SuperLink's state database, copied before a switch and
    put back on rollback.
    """
    previous = host.get_fact(UnitVenv, unit=unit)

    # Same venv as before (or a first install): upload, restart on change.
    if previous is None or previous == plan.paths.venv:
        unit_operation = install_unit(unit, content)
        run_service(unit, changes=[*changes, unit_operation], check_script=check_script)
        return

    # Another venv: stage the unit, then switch in one script that can roll back.
    staging = upgrade_dir(plan.settings)
    files.directory(name=f"{staging} exists", path=staging, user="root", group="root", mode="0700")
    files.put(
        name=f"new {unit} is staged for the switch to flwr {plan.settings['melody_flwr_version']}",
        src=StringIO(content), dest=f"{staging}/{unit}.new", user="root", group="root", mode="0644",
    )
    backup = ""
    if database is not None:
        backup = f" after a copy of {database} to {plan.settings['melody_superlink_backup_dir']}/pre-upgrade/"
    server.shell(
        name=f"{unit} is switched from {previous} to {plan.paths.venv}{backup}, or rolled back",
        commands=[switch_script(plan, unit, previous, check_script, database)],
    )

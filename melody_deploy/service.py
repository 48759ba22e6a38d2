"""Operations that install a unit, start it, and check the outcome."""

from __future__ import annotations

from io import StringIO

from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd

from .units import UNIT_DIR

# How long the outcome checks wait for a started service, in seconds.
CHECK_TIMEOUT = 90


def changed(operations) -> bool:
    return any(operation is not None and operation.did_change() for operation in operations)


@deploy("systemd unit")
def install_unit(unit: str, content: str):
    """Upload the rendered unit; return the operation, which changes only on new content."""
    return files.put(
        name=f"{UNIT_DIR}/{unit} is up to date",
        src=StringIO(content),
        dest=f"{UNIT_DIR}/{unit}",
        user="root",
        group="root",
        mode="0644",
    )


@deploy("Service running")
def run_service(unit: str, changes: list, check_script: str) -> None:
    """Restart the unit after a change, keep it enabled and running, then check it.

    A re-run with nothing changed neither restarts the unit nor runs the
    check, so it reports no changes.
    """
    restart = systemd.service(
        name=f"{unit} is restarted to apply the new unit or venv",
        service=unit,
        running=True,
        restarted=True,
        daemon_reload=True,
        _if=lambda: changed(changes),
    )
    ensure = systemd.service(
        name=f"{unit} is enabled and running",
        service=unit,
        running=True,
        enabled=True,
    )
    server.shell(
        name=f"{unit} is healthy after its start",
        commands=[check_script],
        _if=lambda: changed([restart, ensure]),
    )


def journal_on_failure(unit: str) -> str:
    return f"journalctl --unit {unit} --no-pager --lines 40 >&2"


def superlink_check_script(unit: str, port: int) -> str:
    """Shell check: the unit is active and listening on its port."""
    return "\n".join([
        f"for attempt in $(seq {CHECK_TIMEOUT}); do",
        f"  if systemctl is-active --quiet {unit} && ss -Hltn 'sport = :{port}' | grep -q .; then",
        f"    echo '{unit} is active and listening on port {port}'; exit 0",
        "  fi",
        "  sleep 1",
        "done",
        f"echo '{unit} is not listening on port {port} after {CHECK_TIMEOUT} s; its journal:' >&2",
        journal_on_failure(unit),
        "exit 1",
    ])


def supernode_check_script(unit: str, connected_pattern: str) -> str:
    """Shell check: the unit is active and its journal since the start shows a connection."""
    return "\n".join([
        f"since=$(systemctl show --property ActiveEnterTimestamp --value {unit})",
        f"for attempt in $(seq {CHECK_TIMEOUT}); do",
        f"  if systemctl is-active --quiet {unit} && "
        f"journalctl --unit {unit} --since \"$since\" --no-pager --output cat | grep -q '{connected_pattern}'; then",
        f"    echo '{unit} is active and connected to the SuperLink'; exit 0",
        "  fi",
        "  sleep 1",
        "done",
        f"echo '{unit} did not connect to the SuperLink within {CHECK_TIMEOUT} s; its journal:' >&2",
        journal_on_failure(unit),
        "exit 1",
    ])

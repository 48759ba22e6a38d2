"""Check every host of a federation as an operator would, and print a table.

    .venv/bin/python -m melody_deploy.verify INVENTORY

Connects to each host over SSH with the inventory's own connection data
(through pyinfra, so keys, known_hosts and sudo settings apply as in a
deploy), runs the checks of melody_deploy/verify_checks.py, and prints one
row per host and check. Exits 0 when every check passes, 1 when any check
fails or a host cannot be reached, and 2 when the inventory is invalid.
Nothing on the hosts is changed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import gevent
from pyinfra.api import Config, State
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.context import ctx_state

from .errors import PreflightError
from .preflight import HostSpec, ResolvedHost, validate_inventory
from .verify_checks import RESULTS, host_checks, host_script

log = logging.getLogger("melody_deploy.verify")

# Seconds one host's checks may take before the host is reported as timed out.
HOST_TIMEOUT = 60


@dataclass(frozen=True)
class CheckResult:
    """One row of the table: a host, a check, pass, fail or skip, and why."""

    host: str
    check: str
    result: str
    detail: str


def load_federation(inventory_path: str, state: State):
    """Load the inventory with pyinfra's own loader and validate its settings.

    pyinfra runs an inventory file inside the context of a state, as its CLI does.
    """
    # Imported here because pyinfra_cli monkey-patches the whole process for
    # gevent on import, which only the command line should do.
    from pyinfra_cli.inventory import make_inventory

    ctx_state.set(state)
    inventory = make_inventory(inventory_path)
    specs = [
        HostSpec(name=host.name, groups=tuple(host.groups), data=host.data.dict())
        for host in inventory
    ]
    return inventory, validate_inventory(specs)


def parse_output(host: str, lines: list[str], expected: list[str]) -> list[CheckResult]:
    """Turn the script's result lines into rows, with a failed row for every check that printed none."""
    rows = []
    for line in lines:
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[1] in RESULTS:
            rows.append(CheckResult(host, parts[0], parts[1], parts[2].strip()))
    printed = {row.check for row in rows}
    for check in expected:
        if check not in printed:
            rows.append(CheckResult(host, check, "fail", "the check printed no result"))
    return rows


def verify_host(pyinfra_host, resolved: ResolvedHost, supernode_count: int) -> list[CheckResult]:
    """Run one host's checks in one SSH command and return its rows."""
    checks = host_checks(resolved, supernode_count)
    try:
        _, output = pyinfra_host.run_shell_command(
            host_script(checks), _sudo=bool(pyinfra_host.data.get("_sudo")), _timeout=HOST_TIMEOUT,
        )
    except (PyinfraError, OSError, gevent.Timeout) as error:
        log.error("host %s: the checks could not run: %s", resolved.name, error)
        return [CheckResult(resolved.name, "ssh", "fail", f"checks did not finish: {error}")]
    return parse_output(resolved.name, output.stdout_lines, [check.name for check in checks])


def verify(inventory_path: str) -> list[CheckResult]:
    """Connect to every host of the inventory in parallel and return all rows."""
    state = State(check_for_changes=False)
    inventory, federation = load_federation(inventory_path, state)
    state.init(inventory, Config(CONNECT_TIMEOUT=10))
    hosts: list[ResolvedHost] = [federation.superlink, *federation.supernodes]
    rows: list[CheckResult] = []
    try:
        connect_all(state)
    except PyinfraError as error:
        # pyinfra raises once no host is left; each failed host is still reported below.
        log.error("no host could be reached: %s", error)

    jobs = {}
    for resolved in hosts:
        pyinfra_host = inventory.get_host(resolved.name)
        if not pyinfra_host.connected:
            rows.append(CheckResult(resolved.name, "ssh", "fail",
                                    f"cannot connect to {resolved.address}; see the error above"))
            continue
        jobs[resolved.name] = state.pool.spawn(verify_host, pyinfra_host, resolved, len(federation.supernodes))
    gevent.joinall(list(jobs.values()))
    for resolved in hosts:
        if resolved.name in jobs:
            rows += jobs[resolved.name].get()
    disconnect_all(state)
    return rows


def format_table(rows: list[CheckResult]) -> str:
    host_width = max([len("HOST"), *(len(row.host) for row in rows)])
    check_width = max([len("CHECK"), *(len(row.check) for row in rows)])
    lines = [f"{'HOST':<{host_width}}  {'CHECK':<{check_width}}  RESULT  DETAIL"]
    for row in rows:
        lines.append(f"{row.host:<{host_width}}  {row.check:<{check_width}}  {row.result.upper():<6}  {row.detail}")
    return "\n".join(lines)


def summary(rows: list[CheckResult]) -> str:
    failed = [row for row in rows if row.result == "fail"]
    hosts = sorted({row.host for row in failed})
    if not failed:
        return f"verify: all {len(rows)} checks passed or were skipped"
    return f"verify: {len(failed)} of {len(rows)} checks failed, on {', '.join(hosts)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check every host of a MELODY federation; nothing is changed.")
    parser.add_argument("inventory", help="pyinfra inventory file of the federation")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    try:
        rows = verify(arguments.inventory)
    except PreflightError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print(format_table(rows))
    print(summary(rows))
    return 1 if any(row.result == "fail" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

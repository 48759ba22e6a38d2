"""The checks that `python -m melody_deploy.verify` runs on each host, as shell.

Each check is a small shell snippet that prints one line
`CHECK<TAB>pass|fail|skip<TAB>DETAIL`. All checks of a host are joined into
one script, so verifying a host costs one SSH command.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Callable

from .preflight import ResolvedHost
from .settings import BY_NAME, SUPERLINK
from .units import REMOTE_TLS, SUPERLINK_UNIT, SUPERNODE_UNIT

# flwr logs this once the SuperNode has registered with the SuperLink.
CONNECTED_LOG_LINE = "SuperNode ID:"

RESULTS = ("pass", "fail", "skip")


@dataclass(frozen=True)
class ShellCheck:
    """One named check and the shell snippet that prints its result line."""

    name: str
    script: str


def report(name: str, result: str, detail: str) -> str:
    """Return shell that prints one result line; `detail` may hold shell expansions."""
    return f'printf "%s\\t%s\\t%s\\n" {shlex.quote(name)} {result} "{detail}"'


def unit_of(role: str) -> str:
    return SUPERLINK_UNIT if role == SUPERLINK else SUPERNODE_UNIT


def service_checks(host: ResolvedHost) -> list[ShellCheck]:
    """Return checks that the unit is active now and enabled, so it also starts after a reboot."""
    unit = unit_of(host.role)
    return [
        ShellCheck("service active", "\n".join([
            f"state=$(systemctl is-active {unit})",
            f'if [ "$state" = active ]; then {report("service active", "pass", f"{unit} is active")}',
            f'else {report("service active", "fail", f"{unit} is $state; see journalctl -u {unit}")}; fi',
        ])),
        ShellCheck("service enabled", "\n".join([
            f"state=$(systemctl is-enabled {unit} 2>/dev/null)",
            f'if [ "$state" = enabled ]; then {report("service enabled", "pass", f"{unit} is enabled")}',
            f'else {report("service enabled", "fail", f"{unit} is ${{state:-not installed}}; run the deploy again")}; fi',
        ])),
    ]


def flwr_version_check(host: ResolvedHost) -> ShellCheck:
    """Return a check that the unit's venv contains the flwr release that the inventory sets."""
    unit = unit_of(host.role)
    expected = host.settings["melody_flwr_version"]
    name = "flwr version"
    return ShellCheck(name, "\n".join([
        # ExecStart's `path=` field names the venv's flower-superlink or flower-supernode.
        f"exe=$(systemctl show --property ExecStart --value {unit} | sed -n 's/^{{ path=\\([^ ;]*\\).*/\\1/p')",
        'python="$(dirname "$exe")/python"',
        'if [ -z "$exe" ] || [ ! -x "$python" ]; then '
        + report(name, "fail", f"no venv found from the ExecStart of {unit}; run the deploy again"),
        "else",
        '  version=$("$python" -c "import importlib.metadata as m; print(m.version(\'flwr\'))" 2>&1 | tail -n 1)',
        'venv=$(dirname "$(dirname "$exe")")',
        f'  if [ "$version" = {expected} ]; then {report(name, "pass", f"flwr {expected} in $venv")}',
        f'  else {report(name, "fail", f"venv has flwr $version, the inventory asks for {expected}; run the deploy again")}; fi',
        "fi",
    ]))


def disk_space_check(host: ResolvedHost) -> ShellCheck:
    """Return a check that the folders that grow (state database, logs, app bundles) have free space."""
    minimum = host.settings["melody_verify_min_free_mb"]
    if host.role == SUPERLINK:
        folders = [host.settings["melody_superlink_state_dir"], host.settings["melody_superlink_log_dir"]]
    else:
        folders = [host.settings["melody_supernode_state_dir"]]
    name = "disk space"
    lines = ["low=''", "free_text=''"]
    for folder in folders:
        lines += [
            f"free=$(df --output=avail -BM {folder} 2>/dev/null | tail -n 1 | tr -dc 0-9)",
            f'if [ -z "$free" ]; then low="$low {folder} (missing)"; '
            f'elif [ "$free" -lt {minimum} ]; then low="$low {folder} ($free MiB)"; fi',
            f'free_text="$free_text {folder}: ${{free:-?}} MiB free;"',
        ]
    lines += [
        f'if [ -z "$low" ]; then {report(name, "pass", "$free_text")}',
        f'else {report(name, "fail", f"below melody_verify_min_free_mb = {minimum} MiB:$low")}; fi',
    ]
    return ShellCheck(name, "\n".join(lines))


def listening_check(host: ResolvedHost) -> ShellCheck:
    """Return a check that the SuperLink listens on its HTTP port."""
    port = host.settings["melody_superlink_port"]
    name = "listening"
    return ShellCheck(name, "\n".join([
        f"sockets=$(ss -Hltn 'sport = :{port}' | awk '{{print $4}}' | tr '\\n' ' ')",
        f'if [ -n "$sockets" ]; then {report(name, "pass", f"listening on $sockets")}',
        f'else {report(name, "fail", f"nothing listens on port {port}; see journalctl -u {SUPERLINK_UNIT}")}; fi',
    ]))


# Counts SuperNodes that are online now in the SuperLink's state database,
# opened read-only so the check can never change it.
ONLINE_NODES_SCRIPT = (
    "import sqlite3, sys, time; "
    "db = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True); "
    "print(db.execute(\"SELECT COUNT(*) FROM node WHERE status = 'online' AND online_until > ?\", "
    "(time.time(),)).fetchone()[0])"
)


def online_nodes_check(host: ResolvedHost, expected: int) -> ShellCheck:
    """Return a check that the SuperLink's state lists as many online SuperNodes as the inventory has."""
    database = f"{host.settings['melody_superlink_state_dir']}/state.db"
    name = "supernodes online"
    return ShellCheck(name, "\n".join([
        f"online=$(python3 -c {shlex.quote(ONLINE_NODES_SCRIPT)} {database} 2>&1 | tail -n 1)",
        f'if [ "$online" = {expected} ]; then {report(name, "pass", f"{expected} of {expected} SuperNodes online")}',
        f'else {report(name, "fail", f"$online of {expected} SuperNodes online; see the rows of the SuperNodes")}; fi',
    ]))


def connected_check(host: ResolvedHost) -> ShellCheck:
    """Return a check that the SuperNode registered with the SuperLink since its last start."""
    name = "connected"
    address = host.settings["melody_superlink_address"]
    return ShellCheck(name, "\n".join([
        f"since=$(systemctl show --property ActiveEnterTimestamp --value {SUPERNODE_UNIT})",
        # ActiveEnterTimestamp outlives the service, so a stopped one must not pass.
        f"if ! systemctl is-active --quiet {SUPERNODE_UNIT}; then "
        + report(name, "fail", f"{SUPERNODE_UNIT} is not running"),
        f'elif [ -n "$since" ] && journalctl --unit {SUPERNODE_UNIT} --since "$since" --no-pager --output cat '
        f"| grep -q '{CONNECTED_LOG_LINE}'; then {report(name, 'pass', f'registered with {address} since $since')}",
        f'else {report(name, "fail", f"no {CONNECTED_LOG_LINE} line since the last start; is {address} reachable?")}; fi',
    ]))


def data_dir_check(host: ResolvedHost) -> ShellCheck:
    """Return a check that the site's image manifest is readable."""
    manifest = f"{host.settings['melody_data_dir']}/labels.csv"
    name = "data dir"
    return ShellCheck(name, "\n".join([
        f"if [ -r {manifest} ]; then {report(name, 'pass', f'{manifest} is readable')}",
        f"else {report(name, 'fail', f'{manifest} is missing; export the site images there')}; fi",
    ]))


def certificate_check(host: ResolvedHost) -> ShellCheck:
    """Return a check that the host's TLS certificate is valid for longer than `melody_tls_renew_days`.

    The SuperLink serves its own certificate; a SuperNode trusts the CA
    certificate, so an expired CA stops it as surely.
    """
    name = "certificate"
    if host.settings["melody_insecure"]:
        return ShellCheck(name, report(name, "skip", "TLS is off (melody_insecure = True)"))
    certificate = REMOTE_TLS.certificate if host.role == SUPERLINK else REMOTE_TLS.ca_certificate
    # Only the SuperLink reads melody_tls_renew_days; SuperNodes use its default.
    renew_days = host.settings.get("melody_tls_renew_days", BY_NAME["melody_tls_renew_days"].default)
    return ShellCheck(name, "\n".join([
        f"end=$(openssl x509 -noout -enddate -in {certificate} 2>&1 | sed 's/^notAfter=//')",
        f"if [ ! -r {certificate} ]; then {report(name, 'fail', f'{certificate} is missing; run the deploy again')}",
        f"elif openssl x509 -noout -checkend {renew_days * 86400} -in {certificate} >/dev/null; then "
        + report(name, "pass", f"{certificate} valid until $end"),
        f"else {report(name, 'fail', f'{certificate} expires $end, within {renew_days} days; run the SuperLink deploy to renew it')}; fi",
    ]))


# Functions that add checks for a host; a feature with its own checks (TLS
# certificates, for instance) appends its function here.
ExtraChecks = Callable[[ResolvedHost], list[ShellCheck]]
EXTRA_CHECKS: list[ExtraChecks] = []


def host_checks(host: ResolvedHost, supernode_count: int) -> list[ShellCheck]:
    """Return every check for one host of the federation, in the order the table shows them."""
    checks = service_checks(host)
    if host.role == SUPERLINK:
        checks += [listening_check(host), online_nodes_check(host, supernode_count)]
    else:
        checks += [connected_check(host), data_dir_check(host)]
    checks += [flwr_version_check(host), disk_space_check(host), certificate_check(host)]
    for extra in EXTRA_CHECKS:
        checks += extra(host)
    return checks


def host_script(checks: list[ShellCheck]) -> str:
    """Join the checks into one script; each runs in a subshell so one failing cannot stop the rest."""
    return "\n".join(f"(\n{check.script}\n)" for check in checks)

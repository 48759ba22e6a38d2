"""Audit report of a federation: what ran, what left each site, and what the services did.

    python -m melody_deploy.audit INVENTORY [--since "2026-01-01 00:00"] --out DIR

Gathers over SSH, from every host of the inventory, the SuperLink's runs,
each SuperNode's egress record (file and journal), the deployed versions
and the services' starts, stops and failures, then verifies each site's
hash chain and writes DIR/audit-report.md and DIR/audit-report.json.
Exits 0 when every site's record verifies, 1 when one does not, and 2 when
the inventory is invalid or a host cannot be read.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from melody_audit import chain
from melody_audit import collect as collect_module

from .audit_report import build_report, render_markdown
from .errors import PreflightError
from .preflight import HostSpec, validate_inventory
from .researcher import load_inventory
from .units import AUDIT_SUBDIR, SUPERLINK_UNIT, SUPERNODE_UNIT

logger = logging.getLogger("melody_deploy.audit")

COLLECT_TIMEOUT = 120
SINCE_FORMATS = ("%Y-%m-%d", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S")


class HostReadError(RuntimeError):
    """A host's audit records could not be gathered."""


def parse_since(text: str | None) -> datetime | None:
    if text is None:
        return None
    for form in SINCE_FORMATS:
        try:
            return datetime.strptime(text, form).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise ValueError(f"--since {text!r} is not a UTC date and time such as '2026-01-31' or '2026-01-31 14:00'")


def ssh_argv(spec: HostSpec) -> list[str]:
    """Return the ssh command line for a host from its pyinfra connection data."""
    data = spec.data
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if data.get("ssh_port"):
        argv += ["-p", str(data["ssh_port"])]
    if data.get("ssh_key"):
        argv += ["-i", str(data["ssh_key"])]
    if data.get("ssh_known_hosts_file"):
        argv += ["-o", f"UserKnownHostsFile={data['ssh_known_hosts_file']}"]
    if data.get("ssh_strict_host_key_checking"):
        argv += ["-o", f"StrictHostKeyChecking={data['ssh_strict_host_key_checking']}"]
    user = data.get("ssh_user")
    target = f"{user}@{spec.address}" if user else spec.address
    return [*argv, target]


def collect_host(spec: HostSpec, request: dict) -> dict:
    """Run the collector on one host as root and return its JSON."""
    remote = "python3 - " + shlex.quote(json.dumps(request))
    if spec.data.get("ssh_user", "root") != "root":
        remote = "sudo -n " + remote
    source = Path(collect_module.__file__).read_text()
    logger.info("collecting audit records from %s (%s)", spec.name, spec.address)
    try:
        result = subprocess.run([*ssh_argv(spec), remote], input=source, capture_output=True,
                                text=True, timeout=COLLECT_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        raise HostReadError(f"host {spec.name}: collecting audit records timed out after {COLLECT_TIMEOUT} s") from error
    if result.returncode != 0:
        raise HostReadError(
            f"host {spec.name}: collecting audit records failed (exit {result.returncode}): "
            f"{result.stderr.strip()[-800:]}; check SSH access and sudo rights for the inventory's ssh_user"
        )
    try:
        return json.loads(result.stdout)
    except ValueError as error:
        raise HostReadError(f"host {spec.name}: the audit collector printed invalid JSON: {error}") from error


def gather(specs: list[HostSpec], since: datetime | None) -> dict:
    """Collect every host's records and verify each SuperNode's egress chain."""
    federation = validate_inventory(specs)
    by_name = {spec.name: spec for spec in specs}
    journal_since = since.strftime("%Y-%m-%d %H:%M:%S UTC") if since else "1970-01-01 00:00:00 UTC"

    link = federation.superlink
    hosts = {}
    link_settings = link.settings
    hosts[link.name] = collect_host(by_name[link.name], {
        "role": "superlink",
        "unit": SUPERLINK_UNIT,
        "since": journal_since,
        "database": f"{link_settings['melody_superlink_state_dir']}/state.db",
        "backup_dir": link_settings["melody_superlink_backup_dir"],
    })
    for node in federation.supernodes:
        collected = collect_host(by_name[node.name], {
            "role": "supernode",
            "unit": SUPERNODE_UNIT,
            "since": journal_since,
            "egress_file": f"{node.settings['melody_supernode_state_dir']}/{AUDIT_SUBDIR}/egress.jsonl",
        })
        source = f"{node.name} egress file"
        verification = chain.verify_lines(collected["egress_lines"], source)
        problems = verification.problems + chain.cross_check(verification.records, collected["egress_journal"], source)
        collected["egress_records"] = verification.records
        collected["verification_problems"] = problems
        hosts[node.name] = collected
    return {"superlink": link.name, "supernodes": [node.name for node in federation.supernodes], "hosts": hosts}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inventory", type=Path, help="pyinfra inventory file of the federation")
    parser.add_argument("--since", help="start of the period, UTC, such as '2026-01-31' or '2026-01-31 14:00' (default: everything)")
    parser.add_argument("--out", type=Path, required=True, help="folder for audit-report.md and audit-report.json")
    args = parser.parse_args(argv)

    if not args.inventory.is_file():
        print(f"error: inventory {args.inventory} not found; give the path of a pyinfra inventory file", file=sys.stderr)
        return 2
    try:
        since = parse_since(args.since)
        gathered = gather(load_inventory(args.inventory), since)
    except (ValueError, PreflightError, HostReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    report = build_report(gathered, since)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit-report.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
    (args.out / "audit-report.md").write_text(render_markdown(report))
    print(f"wrote {args.out / 'audit-report.md'} and {args.out / 'audit-report.json'}")

    failed = [site for site, result in report["verification"].items() if not result["ok"]]
    for site in failed:
        for problem in report["verification"][site]["problems"]:
            print(f"verification failed: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

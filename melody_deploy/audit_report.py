"""Turn the gathered audit records into the report's JSON and Markdown."""

from __future__ import annotations

from datetime import datetime, timezone

# Distributions whose versions the report lists for each host.
REPORTED_PACKAGES = ("flwr", "torch", "melody-audit", "systemd-python")


def unsigned_id(value) -> str:
    """Return flwr's unsigned 64-bit id, which its SQLite state stores as a signed integer."""
    number = int(value)
    return str(number + 2**64 if number < 0 else number)


def run_status(row: dict) -> str:
    """Return a run's status as `flwr ls` shows it, from its task's timestamps."""
    if row.get("finished_at"):
        return f"finished:{row.get('sub_status') or ''}"
    for state in ("running", "starting", "pending"):
        if row.get(f"{state}_at"):
            return state
    return "unknown"


def in_period(timestamp: str | None, since: datetime | None) -> bool:
    if since is None or not timestamp:
        return True
    moment = datetime.fromisoformat(str(timestamp).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment >= since


def site_traffic(records: list[dict], since: datetime | None) -> dict[str, dict]:
    """Sum messages and payload bytes per run from one site's verified egress records."""
    per_run: dict[str, dict] = {}
    for record in records:
        if not in_period(record.get("time"), since):
            continue
        run = per_run.setdefault(str(record["run_id"]), {
            "messages": 0, "payload_bytes": 0, "failed_messages": 0, "by_type": {},
            "first": record["time"], "last": record["time"],
        })
        run["messages"] += 1
        run["payload_bytes"] += record["payload_bytes"]
        run["failed_messages"] += record["status"] != "sent"
        run["by_type"][record["message_type"]] = run["by_type"].get(record["message_type"], 0) + 1
        run["last"] = record["time"]
    return per_run


def format_event_time(microseconds: int) -> str:
    return datetime.fromtimestamp(microseconds / 1e6, timezone.utc).isoformat(timespec="seconds")


def build_report(gathered: dict, since: datetime | None) -> dict:
    hosts = gathered["hosts"]
    link = hosts[gathered["superlink"]]
    traffic = {site: site_traffic(hosts[site]["egress_records"], since) for site in gathered["supernodes"]}

    runs = []
    for row in link["runs"]:
        run_id = unsigned_id(row["run_id"])
        sites = {site: per_run[run_id] for site, per_run in traffic.items() if run_id in per_run}
        # A run submitted before the period still belongs in it if a site sent messages for it.
        if not sites and not in_period(row.get("pending_at"), since):
            continue
        runs.append({
            "run_id": run_id,
            "app": f"{row.get('fab_id') or ''} {row.get('fab_version') or ''}".strip(),
            "app_bundle_sha256": row.get("fab_hash"),
            "submitted_by": row.get("flwr_aid") or "",
            "status": run_status(row),
            "details": row.get("details") or "",
            "pending_at": row.get("pending_at"),
            "started_at": row.get("running_at") or row.get("starting_at"),
            "finished_at": row.get("finished_at"),
            # flwr's own count of the bytes the SuperLink received for the run.
            "superlink_bytes_received": row.get("bytes_recv"),
            "sites": sites,
        })

    known_runs = {run["run_id"] for run in runs}
    unmatched = {
        site: sorted(run_id for run_id in per_run if run_id not in known_runs)
        for site, per_run in traffic.items()
    }
    services = {}
    for name, collected in hosts.items():
        services[name] = {
            "role": collected["role"],
            "state": f"{collected['unit'].get('ActiveState')} ({collected['unit'].get('SubState')})",
            "status_text": collected["unit"].get("StatusText", ""),
            "restarts_by_systemd": collected["unit"].get("NRestarts"),
            "events": [
                {**event, "time": format_event_time(event["time_us"])} for event in collected["events"]
            ],
            "venv": collected["versions"]["venv"],
            "versions": {
                package: collected["versions"]["packages"].get(package) for package in REPORTED_PACKAGES
            },
        }
    verification = {
        site: {
            "ok": not hosts[site]["verification_problems"],
            "records": len(hosts[site]["egress_records"]),
            "journal_records": len(hosts[site]["egress_journal"]),
            "problems": hosts[site]["verification_problems"],
        }
        for site in gathered["supernodes"]
    }
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "since": since.isoformat() if since else None,
        "superlink": gathered["superlink"],
        "runs_error": link.get("runs_error"),
        "backups": {"timer": link.get("backup_timer", {}).get("ActiveState"), "files": link.get("backups", [])},
        "runs": runs,
        "egress_without_known_run": {site: ids for site, ids in unmatched.items() if ids},
        "services": services,
        "verification": verification,
    }


def markdown_runs(report: dict) -> list[str]:
    lines = ["## Runs", ""]
    if report["runs_error"]:
        lines += [f"The SuperLink's runs could not be read: {report['runs_error']}", ""]
    if not report["runs"]:
        return lines + ["No runs in the period.", ""]
    lines += [
        "| Run | App | App bundle SHA-256 | Status | Submitted | Started | Finished | Sites |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['run_id']} | {run['app']} | `{run['app_bundle_sha256']}` | {run['status']} "
            f"| {run['pending_at']} | {run['started_at']} | {run['finished_at']} "
            f"| {', '.join(sorted(run['sites'])) or 'none'} |"
        )
    lines += [""]
    for run in report["runs"]:
        total = sum(sent["payload_bytes"] for sent in run["sites"].values())
        lines.append(
            f"- Run {run['run_id']}: the sites recorded {total} payload bytes sent; the SuperLink counted "
            f"{run['superlink_bytes_received']} bytes received."
        )
    lines += ["", "### Sent by each site", "",
              "| Run | Site | Messages | Payload bytes | Failed | Message types | First | Last |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in report["runs"]:
        for site, sent in sorted(run["sites"].items()):
            types = ", ".join(f"{kind} {count}" for kind, count in sorted(sent["by_type"].items()))
            lines.append(
                f"| {run['run_id']} | {site} | {sent['messages']} | {sent['payload_bytes']} "
                f"| {sent['failed_messages']} | {types} | {sent['first']} | {sent['last']} |"
            )
    for site, run_ids in report["egress_without_known_run"].items():
        lines.append(f"\n{site} sent messages for runs the SuperLink does not list: {', '.join(run_ids)}")
    return lines + [""]


def markdown_services(report: dict) -> list[str]:
    lines = ["## Services and versions", "",
             "| Host | Role | State | Restarts by systemd | flwr | torch | melody-audit | venv |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for host, service in report["services"].items():
        versions = service["versions"]
        lines.append(
            f"| {host} | {service['role']} | {service['state']} | {service['restarts_by_systemd']} "
            f"| {versions['flwr']} | {versions['torch']} | {versions['melody-audit']} | `{service['venv']}` |"
        )
    lines += ["", "### Starts, stops and failures in the period", ""]
    for host, service in report["services"].items():
        if service["status_text"]:
            lines.append(f"- {host} status: {service['status_text']}")
        for event in service["events"]:
            lines.append(f"- {event['time']} {host}: {event['event']}: {event['message']}")
    backups = report["backups"]
    lines += ["", f"SuperLink database backup timer: {backups['timer']}; {len(backups['files'])} backups "
              f"(newest: {backups['files'][-1] if backups['files'] else 'none'})."]
    return lines + [""]


def markdown_verification(report: dict) -> list[str]:
    lines = ["## Egress record verification", ""]
    for site, result in report["verification"].items():
        verdict = "verified" if result["ok"] else "FAILED"
        lines.append(
            f"- {site}: {verdict} ({result['records']} records in the file, "
            f"{result['journal_records']} in the journal)"
        )
        for problem in result["problems"]:
            lines.append(f"  - {problem}")
    return lines + [""]


def render_markdown(report: dict) -> str:
    period = f"since {report['since']}" if report["since"] else "all records"
    lines = [
        "# MELODY audit report",
        "",
        f"Generated {report['generated_at']} for {period}. SuperLink: {report['superlink']}.",
        "Payload bytes are the bytes each site uploaded to the SuperLink for its reply messages, "
        "from its verified egress record.",
        "",
    ]
    lines += markdown_verification(report) + markdown_runs(report) + markdown_services(report)
    return "\n".join(lines)

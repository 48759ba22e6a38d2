"""The audit report built from gathered host records, and its command-line input checks."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from melody_deploy.audit import parse_since
from melody_deploy.audit_report import build_report, render_markdown, unsigned_id

REPO = Path(__file__).resolve().parent.parent
RUN_ID = 2**63 + 5


def egress(run_id: int, message_type: str, payload_bytes: int, time: str) -> dict:
    return {"run_id": run_id, "message_type": message_type, "payload_bytes": payload_bytes,
            "status": "sent", "time": time}


def host(role: str, **extra) -> dict:
    return {
        "role": role,
        "unit": {"ActiveState": "active", "SubState": "running", "NRestarts": "0", "StatusText": ""},
        "events": [{"time_us": 1_780_000_000_000_000, "unit": "u", "event": "started", "message": "Started u."}],
        "versions": {"venv": "/opt/melody/venvs/v", "packages": {"flwr": "1.42.0"}},
        **extra,
    }


def gathered() -> dict:
    run_row = {"run_id": RUN_ID - 2**64, "fab_id": "melody/app", "fab_version": "0.1.0", "fab_hash": "ab" * 32,
               "pending_at": "2026-03-01 10:00:00+00:00", "running_at": "2026-03-01 10:00:02+00:00",
               "finished_at": "2026-03-01 10:05:00+00:00", "sub_status": "completed", "bytes_recv": 700}
    site = {"egress_records": [egress(RUN_ID, "train", 500, "2026-03-01T10:01:00+00:00"),
                               egress(RUN_ID, "evaluate", 100, "2026-03-01T10:02:00+00:00")],
            "egress_journal": [{}, {}], "verification_problems": []}
    return {
        "superlink": "link",
        "supernodes": ["site-a", "site-b"],
        "hosts": {
            "link": host("superlink", runs=[run_row], runs_error=None, backups=[]),
            "site-a": host("supernode", **site),
            "site-b": host("supernode", egress_records=[], egress_journal=[],
                           verification_problems=["site-b egress file line 1: record was edited"]),
        },
    }


def test_report_sums_bytes_per_site():
    report = build_report(gathered(), since=None)

    run = report["runs"][0]
    assert run["run_id"] == str(RUN_ID)
    assert run["status"] == "finished:completed"
    assert list(run["sites"]) == ["site-a"]
    assert run["sites"]["site-a"]["payload_bytes"] == 600
    assert run["sites"]["site-a"]["by_type"] == {"train": 1, "evaluate": 1}
    assert report["verification"]["site-b"]["ok"] is False


def test_report_since_drops_older_runs():
    report = build_report(gathered(), since=datetime(2026, 4, 1, tzinfo=timezone.utc))

    assert report["runs"] == []


def test_markdown_names_failed_line():
    markdown = render_markdown(build_report(gathered(), since=None))

    assert "- site-b: FAILED" in markdown
    assert "site-b egress file line 1: record was edited" in markdown
    assert f"| {RUN_ID} | site-a | 2 | 600 |" in markdown


def test_unsigned_id_of_signed_storage():
    assert unsigned_id(-1) == str(2**64 - 1)
    assert unsigned_id(42) == "42"


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "01/02/2026"])
def test_since_rejects_other_formats(text):
    with pytest.raises(ValueError, match="is not a UTC date and time"):
        parse_since(text)


def test_audit_command_rejects_missing_inventory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "melody_deploy.audit", str(tmp_path / "absent.py"), "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True,
    )

    assert result.returncode == 2
    assert f"error: inventory {tmp_path / 'absent.py'} not found" in result.stderr
    assert not (tmp_path / "out").exists()

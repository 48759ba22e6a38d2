"""The SuperNode launcher's session record: which node id this host's key had at which SuperLink."""

from __future__ import annotations

import json

from melody_audit.notify import ServiceStatus
from melody_audit.session import SESSION_FILE, SessionKeeper, session_lapse_seconds

KEY = b"-----BEGIN PUBLIC KEY-----\nfirst\n-----END PUBLIC KEY-----\n"
OTHER_KEY = b"-----BEGIN PUBLIC KEY-----\nsecond\n-----END PUBLIC KEY-----\n"


def keeper(folder, superlink: str = "superlink:8000") -> SessionKeeper:
    return SessionKeeper(folder, ServiceStatus(superlink))


def test_record_round_trip(tmp_path):
    keeper(tmp_path).record(1234567890123, KEY)

    assert keeper(tmp_path).recorded_node_id(KEY) == 1234567890123
    assert json.loads((tmp_path / SESSION_FILE).read_text())["superlink"] == "superlink:8000"
    assert not list(tmp_path.glob("*.tmp"))


def test_record_ignored_for_other_key(tmp_path):
    keeper(tmp_path).record(42, KEY)

    assert keeper(tmp_path).recorded_node_id(OTHER_KEY) is None


def test_record_ignored_for_other_superlink(tmp_path):
    keeper(tmp_path).record(42, KEY)

    assert keeper(tmp_path, "other-superlink:8000").recorded_node_id(KEY) is None


def test_missing_or_corrupt_record(tmp_path):
    assert keeper(tmp_path).recorded_node_id(KEY) is None

    (tmp_path / SESSION_FILE).write_text("{not json")

    assert keeper(tmp_path).recorded_node_id(KEY) is None


def test_lapse_covers_flwr_heartbeat_patience():
    # flwr 1.42.0 keeps a silent node online for 2 heartbeat intervals of 30 s.
    assert session_lapse_seconds() >= 60

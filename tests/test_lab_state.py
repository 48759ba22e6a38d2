"""Unit tests of the lab state file."""

import json

from melody_lab.state import HostState, LabState, read_state, save_state


def sample_state() -> LabState:
    return LabState(
        subnet="10.231.76.0/24",
        bridge="melodylab0",
        ssh_key="/lab/ssh/id_ed25519",
        known_hosts="/lab/ssh/known_hosts",
        hosts=[
            HostState("superlink", "superlink", "10.231.76.10", pid=1234),
            HostState("supernode-1", "supernode", "10.231.76.11", pid=None,
                      partition_id=0, num_partitions=1, data_dir="/srv/melody/data"),
        ],
        dataset="/data/dermamnist28",
    )


def test_state_round_trip(tmp_path):
    path = tmp_path / "state.json"
    save_state(sample_state(), path)

    assert read_state(path) == sample_state()


def test_state_file_shape(tmp_path):
    path = tmp_path / "state.json"
    save_state(sample_state(), path)
    document = json.loads(path.read_text())

    assert document["subnet"] == "10.231.76.0/24"
    assert document["bridge"] == "melodylab0"
    assert document["ssh_key"] == "/lab/ssh/id_ed25519"
    assert document["known_hosts"] == "/lab/ssh/known_hosts"
    assert document["hosts"][0] == {"name": "superlink", "role": "superlink",
                                    "address": "10.231.76.10", "pid": 1234}
    assert document["hosts"][1] == {"name": "supernode-1", "role": "supernode",
                                    "address": "10.231.76.11", "pid": None,
                                    "partition_id": 0, "num_partitions": 1,
                                    "data_dir": "/srv/melody/data"}


def test_state_ignores_unknown_fields():
    document = sample_state().to_dict()
    document["added_later"] = True
    document["hosts"][0]["added_later"] = True

    assert LabState.from_dict(document) == sample_state()


def test_read_state_missing_returns_none(tmp_path):
    assert read_state(tmp_path / "state.json") is None


def test_state_lists_supernodes():
    state = sample_state()

    assert [host.name for host in state.supernodes] == ["supernode-1"]
    assert state.host("superlink").pid == 1234

"""The lab's power commands without a running lab: clear errors, nothing started."""

import os

import pytest

from melody_lab import power
from melody_lab.lab import LabError
from melody_lab.state import HostState, LabState

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the power commands check for root first")


def test_reboot_without_lab_fails(tmp_path, monkeypatch, caplog):
    from melody_lab.__main__ import main

    monkeypatch.setenv("MELODY_LAB_DIR", str(tmp_path / "lab"))

    assert main(["reboot"]) == 1
    assert "no lab is up" in caplog.text


def test_unknown_host_name_rejected():
    state = LabState(subnet="10.231.76.0/24", bridge="melodylab0", ssh_key="key", known_hosts="known",
                     hosts=[HostState("superlink", "superlink", "10.231.76.10"),
                            HostState("supernode-1", "supernode", "10.231.76.11")])

    with pytest.raises(LabError, match="no lab host named supernode-9; the lab has superlink, supernode-1"):
        power.selected_hosts(state, ["supernode-9"])


def test_no_names_selects_every_host():
    state = LabState(subnet="10.231.76.0/24", bridge="melodylab0", ssh_key="key", known_hosts="known",
                     hosts=[HostState("superlink", "superlink", "10.231.76.10")])

    assert [host.name for host in power.selected_hosts(state, [])] == ["superlink"]

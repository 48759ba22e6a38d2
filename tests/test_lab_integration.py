"""The lab on real systemd hosts: boot, names, routes, data shards, and teardown."""

import csv
import io
import os
from pathlib import Path

import pytest

from melody_lab import cgroups, guest, lab as melody_lab, network, nspawn, rootfs, settings, ssh
from melody_lab.data import read_labels, shard_rows

pytestmark = pytest.mark.lab


def run_on(state, name: str, command: str) -> str:
    host = state.host(name)
    result = ssh.run(Path(state.ssh_key), Path(state.known_hosts), host.address, command, timeout=60)
    assert result.returncode == 0, f"{name}: `{command}` failed with {result.returncode}: {result.stderr}"
    return result.stdout


def test_hosts_run_systemd_as_pid1(lab):
    for host in lab.hosts:
        assert run_on(lab, host.name, "cat /proc/1/comm").strip() == "systemd", host.name
        assert run_on(lab, host.name, "systemctl is-system-running").strip() == "running", host.name
        assert run_on(lab, host.name, "hostname").strip() == host.name


def test_hosts_have_distinct_identities(lab):
    machine_ids = {run_on(lab, host.name, "cat /etc/machine-id").strip() for host in lab.hosts}
    host_keys = {run_on(lab, host.name, "cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1] for host in lab.hosts}

    assert len(machine_ids) == len(lab.hosts)
    assert len(host_keys) == len(lab.hosts)


def test_hosts_reach_each_other_by_name(lab):
    for host in lab.supernodes:
        output = run_on(lab, "superlink", f"ping -c1 -W1 {host.name}")
        assert f"({host.address})" in output

    # A TCP connection by name, as a SuperNode will open one to the SuperLink.
    connect = "python3 -c 'import socket; socket.create_connection((\"superlink\", 22), timeout=2).close()'"
    run_on(lab, "supernode-1", connect)


def test_host_has_no_default_route(lab):
    for host in lab.hosts:
        assert run_on(lab, host.name, "ip -4 route show default").strip() == "", host.name
        assert run_on(lab, host.name, "ip -6 route show default").strip() == "", host.name


def test_supernode_shards_are_disjoint(lab):
    all_rows = read_labels(Path(lab.dataset))
    seen_images = set()

    for host in lab.supernodes:
        text = run_on(lab, host.name, f"cat {host.data_dir}/labels.csv")
        rows = list(csv.DictReader(io.StringIO(text)))
        images = {row["image"] for row in rows}

        assert rows == shard_rows(all_rows, host.partition_id, host.num_partitions), host.name
        assert {row["split"] for row in rows} == {"train", "val", "test"}, host.name
        assert not images & seen_images, f"{host.name} shares images with another shard"
        seen_images |= images

        image_count = run_on(lab, host.name, f"find {host.data_dir}/images -type f | wc -l")
        assert int(image_count) == len(rows), host.name
        writable = run_on(lab, host.name, f"find {host.data_dir} -perm /022 -o ! -user root")
        assert writable.strip() == "", f"{host.name}: files writable by others or not root's"

    assert len(seen_images) == len(all_rows)


def test_up_again_is_noop(lab):
    state = melody_lab.up(supernodes=len(lab.supernodes), dataset=Path(lab.dataset))

    assert [host.pid for host in state.hosts] == [host.pid for host in lab.hosts]
    assert all(nspawn.is_running(host.pid, host.name) for host in state.hosts)


def leftovers(state) -> list[str]:
    """Return what a lab left on this machine after `down`, described for the failure message."""
    found = []
    if network.is_bridge(state.bridge):
        found.append(f"bridge {state.bridge}")
    found += [f"mount {point}" for point in rootfs.mount_points() if settings.state_dir() in point.parents]
    for host in state.hosts:
        if nspawn.is_running(host.pid, host.name):
            found.append(f"{host.name}: nspawn PID {host.pid}")
        found += [f"{host.name}: cgroup {folder}" for folder in cgroups.host_cgroups(host.name) if folder.exists()]
        propagate_dir = nspawn.PROPAGATE_DIR / settings.machine_name(host.name)
        if propagate_dir.exists():
            found.append(f"{host.name}: {propagate_dir}")
    for path in ("state.json", "rootfs", "hosts"):
        if (settings.state_dir() / path).exists():
            found.append(f"{settings.state_dir() / path}")
    return found


@pytest.mark.lab_lifecycle
def test_down_removes_everything(lab):
    before = melody_lab.load_state()

    melody_lab.down()

    assert leftovers(before) == []
    for host in before.hosts:
        assert not os.path.exists(f"/proc/{host.pid}") or not nspawn.is_running(host.pid, host.name)
    # A second down finds nothing and must not fail.
    melody_lab.down()

    # Restart the lab so that the session fixture leaves things as it found
    # them; the host keys stay, so known_hosts still matches.
    restarted = melody_lab.up(supernodes=len(before.supernodes), dataset=Path(before.dataset))
    assert run_on(restarted, "superlink", "systemctl is-system-running").strip() == "running"


@pytest.mark.lab_lifecycle
def test_degraded_host_fails_up(lab, monkeypatch):
    before = melody_lab.load_state()
    melody_lab.down()
    prepare = guest.prepare

    def prepare_with_failing_unit(root, host, *arguments):
        prepare(root, host, *arguments)
        if host.name == "supernode-2":
            unit = "/etc/systemd/system/fails-on-purpose.service"
            guest.write_file(root, unit, "[Service]\nType=oneshot\nExecStart=/bin/false\n")
            wants = root / "etc/systemd/system/multi-user.target.wants"
            wants.mkdir(exist_ok=True)
            (wants / "fails-on-purpose.service").symlink_to(unit)

    monkeypatch.setattr(guest, "prepare", prepare_with_failing_unit)
    with pytest.raises(melody_lab.LabError) as raised:
        melody_lab.up(supernodes=len(before.supernodes), dataset=Path(before.dataset))

    assert "supernode-2" in str(raised.value)
    assert "degraded" in str(raised.value)
    assert "fails-on-purpose.service" in str(raised.value)
    # up tears a failed lab down by itself.
    assert melody_lab.load_state() is None
    assert leftovers(before) == []

    monkeypatch.setattr(guest, "prepare", prepare)
    restarted = melody_lab.up(supernodes=len(before.supernodes), dataset=Path(before.dataset))
    assert run_on(restarted, "supernode-2", "systemctl is-system-running").strip() == "running"

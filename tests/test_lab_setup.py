"""Unit tests of the lab's checks and generated files that need no running lab."""

import ipaddress
import json

import pytest

from melody_lab import guest, lab, network, rootfs
from melody_lab.plan import parse_subnet, plan_hosts


def test_apt_one_line_sources():
    text = "# comment\ndeb [arch=amd64] http://mirror.example/debian bookworm main\n"

    assert rootfs._parse_apt_file(text) == [("http://mirror.example/debian", ["bookworm"])]


def test_apt_deb822_sources():
    text = ("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
            "Components: main\n\nTypes: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n")

    assert rootfs._parse_apt_file(text) == [("http://mirror.example/debian", ["bookworm", "bookworm-updates"])]


def test_recipe_key_follows_packages(monkeypatch):
    key = rootfs.recipe_key()
    assert rootfs.recipe_key() == key

    monkeypatch.setattr(rootfs, "PACKAGES", (*rootfs.PACKAGES, "less"))
    assert rootfs.recipe_key() != key


def test_subnet_clash_with_route(monkeypatch):
    routes = [{"dst": "default", "dev": "eth0"},
              {"dst": "10.231.0.0/16", "dev": "wg0"}]
    monkeypatch.setattr(network, "_ip", lambda *arguments: json.dumps(routes))

    with pytest.raises(network.NetworkError, match="overlaps the existing route"):
        network.check_subnet_free(ipaddress.IPv4Network("10.231.76.0/24"), "melodylab0")


def test_subnet_free_ignores_lab_bridge(monkeypatch):
    routes = [{"dst": "10.231.76.0/24", "dev": "melodylab0"}]
    monkeypatch.setattr(network, "_ip", lambda *arguments: json.dumps(routes))

    network.check_subnet_free(ipaddress.IPv4Network("10.231.76.0/24"), "melodylab0")


def test_subnet_clash_with_loopback():
    # Every Linux machine routes 127.0.0.0/8 in its local table, so this reads
    # the real routing table without sending anything.
    with pytest.raises(network.NetworkError, match="overlaps"):
        network.check_subnet_free(ipaddress.IPv4Network("127.0.0.0/24"), "melodylab0")


def test_up_rejects_non_root(monkeypatch):
    monkeypatch.setattr(lab.os, "geteuid", lambda: 1000)

    with pytest.raises(lab.LabError, match="needs root"):
        lab.up()


def test_up_names_setup_script_for_missing_tool(monkeypatch):
    monkeypatch.setattr(lab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(lab.shutil, "which", lambda tool: None if tool == "debootstrap" else "/usr/bin/" + tool)

    with pytest.raises(lab.LabError, match=r"debootstrap.*scripts/setup.sh"):
        lab.up()


def test_hosts_file_names_every_host():
    hosts = plan_hosts(parse_subnet("10.231.76.0/24"), 2)
    lines = guest.hosts_file(hosts).splitlines()

    assert "10.231.76.10\tsuperlink" in lines
    assert "10.231.76.11\tsupernode-1" in lines
    assert "10.231.76.12\tsupernode-2" in lines


def test_network_file_has_no_gateway():
    host = plan_hosts(parse_subnet("10.231.76.0/24"), 1)[1]
    text = guest.network_file(host, 24)

    assert "Name=host0" in text
    assert "Address=10.231.76.11/24" in text
    assert "Gateway" not in text


def test_cli_rejects_bad_subnet(capsys):
    from melody_lab.__main__ import main

    assert main(["up", "--subnet", "10.231.76.0/30"]) == 1


def test_cli_status_without_lab(tmp_path, monkeypatch, capsys):
    from melody_lab.__main__ import main

    monkeypatch.setenv("MELODY_LAB_DIR", str(tmp_path / "lab"))

    assert main(["status"]) == 1
    assert "no lab is up" in capsys.readouterr().out


@pytest.mark.skipif(lab.os.geteuid() != 0, reason="down checks for root first")
def test_down_without_lab_is_noop(tmp_path, monkeypatch):
    monkeypatch.setenv("MELODY_LAB_DIR", str(tmp_path / "lab"))

    lab.down()

    assert not (tmp_path / "lab").exists()


def test_guest_path_rejects_symlinked_parent(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "srv").symlink_to(tmp_path / "outside")

    assert guest.guest_path(root, "/etc/hostname") == root / "etc/hostname"
    with pytest.raises(RuntimeError, match="is a symlink"):
        guest.guest_path(root, "/srv/melody/data")

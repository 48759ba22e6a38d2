"""The researcher's Flower connection, written from an inventory and read back by flwr."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path

import pytest

from melody_deploy import researcher, tls

REPO = Path(__file__).resolve().parent.parent


def secure_inventory(tmp_path: Path) -> Path:
    """Write an inventory that is tres.py with a generated CA in tmp_path; return its path."""
    tls_dir = tmp_path / "tls"
    tls.ensure_generated(tls_dir, ["superlink.melody.example", "localhost", "127.0.0.1"], 365, 30)
    inventory = tmp_path / "federation.py"
    inventory.write_text(textwrap.dedent(f"""\
        import runpy
        tres = runpy.run_path({str(REPO / "inventories" / "tres.py")!r})
        superlink = [(name, {{**data, "melody_tls_dir": {str(tls_dir)!r}}}) for name, data in tres["superlink"]]
        supernodes = tres["supernodes"]
    """))
    return inventory


def test_secure_inventory_gives_tunnel_and_ca(tmp_path):
    specs = researcher.load_inventory(secure_inventory(tmp_path))
    copy = tmp_path / "home" / "tre-ca.pem"

    entry = researcher.connection_entry(specs, address=None, tunnel_port=18123, ca_copy=copy)

    assert entry == {"address": "127.0.0.1:18123", "root-certificates": str(copy)}
    assert copy.read_bytes() == (tmp_path / "tls" / "ca.pem").read_bytes()


def test_tunnel_command_targets_control_port(tmp_path):
    specs = researcher.load_inventory(secure_inventory(tmp_path))

    command = researcher.tunnel_command(specs, 18123, ["-i", "key"])

    assert command == ["ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-L", "127.0.0.1:18123:127.0.0.1:8001",
                       "-i", "key", "melody-control@superlink.melody.example"]


def test_insecure_inventory_gives_superlink_address():
    specs = researcher.load_inventory(REPO / "inventories" / "tres.py")
    for spec in specs:
        spec.data["melody_insecure"] = True

    entry = researcher.connection_entry(specs, address=None)

    assert entry == {"address": "superlink.melody.example:8000", "insecure": True}


def test_missing_ca_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    code = researcher.main([str(REPO / "inventories" / "tres.py"), "--connection", "tre"])

    assert code == 2
    assert "CA certificate .cache/tls/ca.pem not found" in capsys.readouterr().err


def test_existing_entries_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    config = tmp_path / "config.toml"
    config.write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')

    code = researcher.main([str(secure_inventory(tmp_path)), "--connection", "tre"])

    written = tomllib.loads(config.read_text())
    assert code == 0
    assert written["superlink"]["default"] == "local"
    assert written["superlink"]["local"] == {"address": ":local:"}
    assert written["superlink"]["tre"]["address"] == "127.0.0.1:18000"


def test_flwr_reads_written_connection(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    researcher.main([str(secure_inventory(tmp_path)), "--connection", "tre", "--tunnel-port", "18123"])
    from flwr.cli.flower_config import read_superlink_connection

    connection = read_superlink_connection("tre")

    assert connection.address == "127.0.0.1:18123"
    assert connection.root_certificates == str(tmp_path / "tre-ca.pem")
    assert not connection.insecure


def test_invalid_inventory_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    inventory = tmp_path / "broken.py"
    inventory.write_text('superlink = ["a", "b"]\nsupernodes = []\n')

    code = researcher.main([str(inventory)])

    assert code == 2
    assert "exactly one host in the 'superlink' group" in capsys.readouterr().err
    assert not (tmp_path / "config.toml").exists()

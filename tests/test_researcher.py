"""The researcher's Flower connection, written from an inventory and read back by flwr."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from melody_deploy import researcher

REPO = Path(__file__).resolve().parent.parent


def test_example_inventory_gives_superlink_address():
    specs = researcher.load_inventory(REPO / "inventories" / "tres.py")

    entry = researcher.connection_entry(specs, address=None)

    assert entry == {"address": "superlink.melody.example:8000", "insecure": True}


def test_existing_entries_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    config = tmp_path / "config.toml"
    config.write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')

    code = researcher.main([str(REPO / "inventories" / "tres.py"), "--connection", "tre"])

    written = tomllib.loads(config.read_text())
    assert code == 0
    assert written["superlink"]["default"] == "local"
    assert written["superlink"]["local"] == {"address": ":local:"}
    assert written["superlink"]["tre"]["address"] == "superlink.melody.example:8000"


def test_flwr_reads_written_connection(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    researcher.main([str(REPO / "inventories" / "tres.py"), "--connection", "tre",
                     "--address", "superlink.melody.example:9443"])
    from flwr.cli.flower_config import read_superlink_connection

    connection = read_superlink_connection("tre")

    assert connection.address == "superlink.melody.example:9443"
    assert connection.insecure is True


def test_invalid_inventory_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    inventory = tmp_path / "broken.py"
    inventory.write_text('superlink = ["a", "b"]\nsupernodes = []\n')

    code = researcher.main([str(inventory)])

    assert code == 2
    assert "exactly one host in the 'superlink' group" in capsys.readouterr().err
    assert not (tmp_path / "config.toml").exists()

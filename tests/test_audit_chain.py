"""The egress file's hash chain, its cross-check with the journal, and the database backup."""

from __future__ import annotations

import json
import sqlite3

import pytest

from melody_audit import backup, chain


def write_chain(path, count: int) -> list[dict]:
    records = []
    prev_hash = chain.GENESIS_HASH
    for seq in range(1, count + 1):
        record = chain.seal({"seq": seq, "run_id": 7, "time": f"2026-01-01T00:00:0{seq}", "payload_bytes": 100 * seq},
                            prev_hash)
        records.append(record)
        prev_hash = record["hash"]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


def test_intact_chain_verifies(tmp_path):
    path = tmp_path / "egress.jsonl"
    write_chain(path, 4)

    result = chain.verify_lines(path.read_text().splitlines())

    assert result.ok, result.problems
    assert len(result.records) == 4


def test_edited_line_named(tmp_path):
    path = tmp_path / "egress.jsonl"
    write_chain(path, 4)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"payload_bytes": 300', '"payload_bytes": 3')

    result = chain.verify_lines(lines)

    assert result.problems == ["egress file line 3: record was edited (its hash does not match its content)"]


def test_deleted_line_named(tmp_path):
    path = tmp_path / "egress.jsonl"
    write_chain(path, 4)
    lines = path.read_text().splitlines()
    del lines[1]

    result = chain.verify_lines(lines)

    assert not result.ok
    assert all(problem.startswith("egress file line 2:") for problem in result.problems), result.problems


def test_cut_last_line_found_by_journal(tmp_path):
    path = tmp_path / "egress.jsonl"
    records = write_chain(path, 3)
    lines = path.read_text().splitlines()[:-1]

    result = chain.verify_lines(lines)
    problems = chain.cross_check(result.records, records)

    assert result.ok, "a cut tail keeps the chain itself valid"
    assert len(problems) == 1
    assert "seq 3" in problems[0]
    assert "missing from the file" in problems[0]


def test_last_hash_continues_chain(tmp_path):
    path = tmp_path / "egress.jsonl"
    records = write_chain(path, 2)

    assert chain.last_hash(path) == (records[-1]["hash"], 2)
    assert chain.last_hash(tmp_path / "absent.jsonl") == (chain.GENESIS_HASH, 0)


def test_backup_keeps_newest_copies(tmp_path):
    database = tmp_path / "state.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE run (run_id INTEGER)")
        connection.execute("INSERT INTO run VALUES (42)")
    backups = tmp_path / "backups"
    backups.mkdir()
    for index in range(3):
        (backups / f"state-2020010{index}T000000Z.db").write_bytes(b"old")

    target = backup.back_up(database, backups, keep=2)

    with sqlite3.connect(target) as connection:
        assert connection.execute("SELECT run_id FROM run").fetchall() == [(42,)]
    assert sorted(path.name for path in backups.iterdir()) == ["state-20200102T000000Z.db", target.name]


def test_backup_missing_database_fails(tmp_path):
    with pytest.raises(sqlite3.OperationalError):
        backup.back_up(tmp_path / "absent.db", tmp_path, keep=1)
    assert list(tmp_path.iterdir()) == []

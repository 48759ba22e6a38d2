"""The hash-chained egress file: one JSON record a line, each naming its predecessor's hash.

Standard library only, because the operator's machine verifies the files it
collects with this module and the SuperNode writes them with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# `prev_hash` of the first record in a file.
GENESIS_HASH = "0" * 64


def record_hash(record: dict) -> str:
    """Return the SHA-256 of the record's canonical JSON, without its own `hash` field."""
    body = {key: value for key, value in record.items() if key != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(record: dict, prev_hash: str) -> dict:
    """Return the record with `prev_hash` and its own `hash` filled in."""
    sealed = {**record, "prev_hash": prev_hash}
    sealed["hash"] = record_hash(sealed)
    return sealed


def last_hash(path: Path) -> tuple[str, int]:
    """Return the hash and `seq` of the file's last record, or the genesis values.

    A last line that is not a valid record still anchors the chain (by the
    hash of its raw text), so verification flags that line and not the next.
    """
    if not path.exists():
        return GENESIS_HASH, 0
    lines = path.read_bytes().splitlines()
    if not lines:
        return GENESIS_HASH, 0
    last = lines[-1]
    try:
        record = json.loads(last)
        return str(record["hash"]), int(record["seq"])
    except (ValueError, KeyError, TypeError):
        return hashlib.sha256(last).hexdigest(), len(lines)


@dataclass
class Verification:
    """Result of checking one egress file: records read and the problems found."""

    records: list[dict]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_lines(lines: list[str], source: str = "egress file") -> Verification:
    """Check every line's own hash, its link to the previous line, and the `seq` numbers.

    Each problem names the line number (from 1), so an operator finds the
    edited or deleted record.
    """
    records: list[dict] = []
    problems: list[str] = []
    expected_prev = GENESIS_HASH
    expected_seq = 1
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            stored_hash = record["hash"]
            prev_hash = record["prev_hash"]
            seq = record["seq"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{source} line {number}: not a valid egress record")
            expected_prev = hashlib.sha256(line.encode()).hexdigest()
            expected_seq += 1
            continue

        if record_hash(record) != stored_hash:
            problems.append(f"{source} line {number}: record was edited (its hash does not match its content)")
        if prev_hash != expected_prev:
            problems.append(
                f"{source} line {number}: prev_hash does not match the record before it; "
                f"a record before line {number} was deleted, inserted or edited"
            )
        if seq != expected_seq:
            problems.append(f"{source} line {number}: seq is {seq}, expected {expected_seq}; records are missing")
        records.append(record)
        expected_prev = stored_hash
        expected_seq = seq + 1 if isinstance(seq, int) else expected_seq + 1
    return Verification(records, problems)


def cross_check(file_records: list[dict], journal_records: list[dict], source: str = "egress file") -> list[str]:
    """Compare the file with the copies in journald, which the service user cannot rewrite.

    Catches what the chain alone cannot: the last records cut off, or the
    whole file rewritten with a fresh, self-consistent chain.
    """
    problems = []
    in_file = {record.get("hash") for record in file_records}
    positions = {record.get("hash"): index for index, record in enumerate(file_records, start=1)}
    for record in journal_records:
        if record["hash"] not in in_file:
            problems.append(
                f"{source}: the journal's egress record seq {record['seq']} (run {record['run_id']}, "
                f"{record['time']}) is missing from the file"
            )
    journal_hashes = {record["hash"] for record in journal_records}
    if journal_records:
        for record in file_records:
            if record.get("hash") not in journal_hashes and record.get("seq", 0) >= min(r["seq"] for r in journal_records):
                problems.append(
                    f"{source} line {positions[record.get('hash')]}: record seq {record.get('seq')} "
                    f"has no copy in the journal"
                )
    return problems

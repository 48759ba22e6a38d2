"""Egress records: one per reply message that this SuperNode pushes to the SuperLink.

A record holds when the message left, for which run, round and message
type, to which SuperLink, how many bytes of payload were uploaded, and the
SHA-256 of those bytes. It contains no payload content, so no image,
label or model value is written to the record.

Each record goes to an append-only, hash-chained file in the SuperNode's
state folder and to journald with structured fields.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import chain
from .flwr_compat import sent_object_ids

logger = logging.getLogger("melody_audit.egress")

# journald identifier of the records, used by the audit report to find them.
SYSLOG_IDENTIFIER = "melody-egress"
# NOTE: the file is never rotated; it grows by about 700 bytes per message sent.
EGRESS_FILE = "egress.jsonl"


@dataclass
class PendingMessage:
    """A reply message between its `send` and the end of its object uploads."""

    metadata: Any
    round: str
    object_order: list[str]
    to_push: set[str]
    # Object id -> its content, kept by reference (bytes are immutable) until
    # the record is written, so the payload can be hashed in tree order.
    pushed: dict[str, bytes] = field(default_factory=dict)
    error: str = ""


def journal_fields(record: dict) -> dict[str, str]:
    """Map a record to journald fields: upper-case names with the MELODY_ prefix."""
    return {f"MELODY_{key.upper()}": str(value) for key, value in record.items()}


class EgressRecorder:
    """Records each reply message pushed to the SuperLink in the file and in journald."""

    def __init__(self, folder: Path, destination: str, on_record: Callable[[dict], None] | None = None):
        self.path = folder / EGRESS_FILE
        self.destination = destination
        self.on_record = on_record
        self.lock = threading.Lock()
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.prev_hash, self.seq = chain.last_hash(self.path)
        logger.info("egress record %s continues at seq %d", self.path, self.seq + 1)

    def record(self, pending: PendingMessage, node_id: int) -> dict:
        """Seal and write the record of one message; return it."""
        metadata = pending.metadata
        digest = hashlib.sha256()
        payload_bytes = 0
        for object_id in pending.object_order:
            content = pending.pushed.get(object_id)
            if content is not None:
                digest.update(content)
                payload_bytes += len(content)

        complete = not pending.error and pending.to_push <= pending.pushed.keys()
        with self.lock:
            self.seq += 1
            record = chain.seal(
                {
                    "seq": self.seq,
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "run_id": metadata.run_id,
                    "message_type": metadata.message_type,
                    "round": pending.round,
                    "message_id": metadata.message_id,
                    "reply_to": metadata.reply_to_message_id,
                    "node_id": node_id,
                    "destination": self.destination,
                    "payload_bytes": payload_bytes,
                    "payload_sha256": digest.hexdigest(),
                    "objects_pushed": len(pending.pushed),
                    "objects_already_on_superlink": len(pending.object_order) - len(pending.to_push),
                    "status": "sent" if complete else "failed",
                    "error": pending.error,
                },
                self.prev_hash,
            )
            self.write_file(record)
            self.prev_hash = record["hash"]
        self.write_journal(record)
        if self.on_record is not None:
            self.on_record(record)
        return record

    def write_file(self, record: dict) -> None:
        # O_APPEND keeps every write at the end even if another process has the
        # file open, and fsync makes the record durable before the next one.
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def write_journal(self, record: dict) -> None:
        message = (
            f"egress: run {record['run_id']} round {record['round']} {record['message_type']} "
            f"reply to {record['destination']}: {record['payload_bytes']} bytes, "
            f"sha256 {record['payload_sha256']}, {record['status']}"
        )
        try:
            from systemd import journal  # pylint: disable=import-outside-toplevel
        except ImportError:
            logger.error("systemd-python is missing, egress record seq %d is only in %s", record["seq"], self.path)
            return
        journal.send(message, SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER, **journal_fields(record))


class RoundTracker:
    """Finds the round of each instruction message from its `server-round` config value.

    flwr 1.42's strategies leave `group_id` empty and put the round number in
    the instruction's ConfigRecord, which the SuperNode pulls as one object.
    Only ConfigRecord objects are parsed, never arrays or other content.
    """

    # Instructions remembered at most; a reply normally follows within seconds.
    MAX_TRACKED = 1000

    def __init__(self):
        self.lock = threading.Lock()
        self.owner: dict[str, str] = {}
        self.rounds: dict[str, str] = {}

    def note_instruction(self, message_id: str, object_ids: list[str]) -> None:
        with self.lock:
            if len(self.owner) > self.MAX_TRACKED * 50:
                self.owner.clear()
            for object_id in object_ids:
                self.owner[object_id] = message_id

    def note_object(self, object_id: str, content: bytes) -> None:
        from flwr.app import ConfigRecord  # pylint: disable=import-outside-toplevel
        from flwr.supercore.inflatable.inflatable_object import (  # pylint: disable=import-outside-toplevel
            get_object_type_from_object_content,
        )

        message_id = self.owner.get(object_id)
        if message_id is None or get_object_type_from_object_content(content) != "ConfigRecord":
            return
        value = ConfigRecord.inflate(content).get("server-round")
        if value is not None:
            with self.lock:
                if len(self.rounds) > self.MAX_TRACKED:
                    self.rounds.pop(next(iter(self.rounds)))
                self.rounds[message_id] = str(value)

    def round_of(self, metadata) -> str:
        """Return the reply's round: its group_id, else its instruction's `server-round`, else ''."""
        if metadata.group_id:
            return str(metadata.group_id)
        with self.lock:
            return self.rounds.pop(metadata.reply_to_message_id, "")


class MessagePushAudit:
    """Wraps the `send` and `push_object` functions of one `_push_messages` call.

    flwr sends a reply's metadata and object tree with `send`, which returns
    the ids of the objects that the SuperLink still lacks, then uploads each
    of those with `push_object`, several at a time on worker threads.
    """

    def __init__(
        self, recorder: EgressRecorder, node_id: int, tree_order: Callable[[Any], list[str]], rounds: RoundTracker,
    ):
        self.recorder = recorder
        self.rounds = rounds
        self.node_id = node_id
        self.tree_order = tree_order
        self.lock = threading.Lock()
        self.pending: list[PendingMessage] = []
        self.by_object: dict[tuple[int, str], PendingMessage] = {}

    def wrap_send(self, send):
        def audited_send(message, object_tree, clientapp_runtime):
            result = send(message, object_tree, clientapp_runtime)
            ids_to_send = sent_object_ids(result)
            pending = PendingMessage(
                message.metadata, self.rounds.round_of(message.metadata), self.tree_order(object_tree), set(ids_to_send),
            )
            with self.lock:
                self.pending.append(pending)
                for object_id in ids_to_send:
                    self.by_object[(message.metadata.run_id, object_id)] = pending
            return result

        return audited_send

    def wrap_push_object(self, push_object):
        # flwr 1.42 passes (run_id, session_id, object_id, content), 1.27 (run_id, object_id, content).
        def audited_push_object(run_id, *arguments):
            object_id, content = arguments[-2], arguments[-1]
            pending = self.by_object.get((run_id, object_id))
            try:
                push_object(run_id, *arguments)
            except BaseException as error:
                if pending is not None:
                    pending.error = f"push of object {object_id} failed: {type(error).__name__}: {error}"
                raise
            if pending is not None:
                with self.lock:
                    pending.pushed[object_id] = content

        return audited_push_object

    def write_records(self) -> None:
        """Write one record for every message this call sent, complete or not."""
        for pending in self.pending:
            try:
                self.recorder.record(pending, self.node_id)
            except OSError as error:
                logger.error(
                    "egress record of message %s (run %s) could not be written: %s",
                    pending.metadata.message_id, pending.metadata.run_id, error,
                )
        self.pending.clear()
        self.by_object.clear()

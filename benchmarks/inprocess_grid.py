"""A Flower Grid that delivers messages to ClientApps in this process, one site after another.

The benchmark uses it to run the real ServerApp and ClientApp code without a
SuperLink or the lab. Every message goes through Flower's own protobuf
serialisation both ways, as it would on the wire, so each site's bytes per
round are measured on the serialised reply.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

# The SuperLink's own node id in Flower's message metadata.
SERVER_NODE_ID = 0


@dataclass
class Site:
    """One in-process SuperNode: its node id, node config and per-message byte counts."""

    node_id: int
    node_config: dict
    sent_bytes: list[tuple[str, int]] = field(default_factory=list)


class InProcessGrid(Grid):
    """Send each message to its site's ClientApp in this process and return the replies."""

    def __init__(self, app: ClientApp, sites: list[Site], run_id: int, run_config: dict) -> None:
        self.app = app
        self.sites = {site.node_id: site for site in sites}
        self.run_id = run_id
        self.run_config = run_config
        self.contexts = {
            site.node_id: Context(run_id, site.node_id, site.node_config, RecordDict(), run_config)
            for site in sites
        }
        # Flower stamps messages with the identity of the task in this process.
        TaskIdentity.run_id = run_id
        TaskIdentity.task_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID

    def set_run(self, run) -> None:
        raise NotImplementedError("the in-process grid serves one run, given when it is made")

    @property
    def run(self):
        raise NotImplementedError("the in-process grid has no SuperLink run record")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterable[Message]:
        replies = []
        for message in messages:
            replies.append(self._deliver(message))
        return replies

    def _deliver(self, message: Message) -> Message:
        """Run one message through the site's ClientApp, serialising it both ways."""
        metadata = message.metadata.__dict__
        metadata["_message_id"] = str(uuid.uuid4())
        metadata["_run_id"] = self.run_id
        metadata["_src_node_id"] = SERVER_NODE_ID
        received = message_from_proto(message_to_proto(message))
        site = self.sites[message.metadata.dst_node_id]

        started = time.perf_counter()
        TaskIdentity.node_id = site.node_id
        try:
            reply = self.app(received, self.contexts[site.node_id])
        except Exception as error:  # noqa: BLE001 - a site's failure becomes its error reply
            log.error("Site %s failed: %s", site.node_id, traceback.format_exc())
            reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"),
                            reply_to=received)
        finally:
            TaskIdentity.node_id = SERVER_NODE_ID
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        wire = message_to_proto(reply)
        site.sent_bytes.append((message.metadata.message_type, wire.ByteSize()))
        log.info("Site %s returned its %s reply in %.1f s, %d bytes", site.node_id,
                 message.metadata.message_type, time.perf_counter() - started, wire.ByteSize())
        return message_from_proto(wire)

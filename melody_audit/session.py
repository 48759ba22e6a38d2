"""Reclaim the SuperLink session that a crashed SuperNode process left open.

flwr 1.42.0's SuperLink counts a node as online until its heartbeat lapses,
up to HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL (2 x 30 s) after the
last heartbeat. While the node counts as online, the SuperLink rejects its
ActivateNode with HTTP 412 (code 2004), the same response that a key that
was never registered gets, and flwr's SuperNode exits on it (code 305). A
process that was killed never sent its DeactivateNode, so its restart would
be rejected for up to a minute.

The launcher wraps ActivateNode so that, on that 412, it:
- sends the DeactivateNode that the killed process skipped, for the node id
  that this host's key had last time (kept in `session.json` beside the
  egress record), signed with the same key by flwr's own client;
- keeps the node offline for OFFLINE_HOLD_SECONDS, so that a ServerApp that
  waits for the killed process's reply finds the node offline and gets an
  error reply instead of waiting for its round timeout;
- then activates again, and retries with logged backoff while the SuperLink
  returns 412 or 500, up to the heartbeat lapse;
- exits with EXIT_NOT_REGISTERED when the key is not registered (no node id
  recorded for it, or the SuperLink rejects the recorded one as not this
  key's), so that the unit can leave that case to the operator instead of
  restarting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from .notify import ServiceStatus, sd_notify

logger = logging.getLogger("melody_audit.session")

SESSION_FILE = "session.json"
# Exit status when the SuperLink does not know this SuperNode's key: EX_CONFIG
# from sysexits.h. The unit lists it in RestartPreventExitStatus=, because a
# restart cannot fix it; registering the key and restarting the service does.
EXIT_NOT_REGISTERED = 78
# Seconds the node stays offline between closing the killed process's session
# and activating again. One poll of the ServerApp must see the node offline to
# turn the lost instruction into an error reply. flwr 1.42's ServerApp polls
# every 3 s plus the request's own time (HttpGrid.send_and_receive).
# NOTE: 3.5 s assumes a poll request of at most 0.5 s. A slower poll can
# miss the offline node, so the round then waits for its timeout.
OFFLINE_HOLD_SECONDS = 3.5
# Maximum wait between two activation attempts.
MAX_RETRY_DELAY_SECONDS = 10.0

HTTP_PRECONDITION_FAILED = 412
HTTP_UNAUTHORIZED = 401
# flwr 1.42's SuperLink returns 500 when its SQLite database is locked.
RETRIED_STATUS_CODES = (HTTP_PRECONDITION_FAILED, 500)


def key_digest(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()


class SessionKeeper:
    """Keeps the node id of this host's key and reclaims a session that a crash left open."""

    def __init__(self, folder: Path, status: ServiceStatus, sleep: Callable[[float], None] = time.sleep):
        self.path = folder / SESSION_FILE
        self.status = status
        self.sleep = sleep
        self.lapse_seconds = session_lapse_seconds()

    def recorded_node_id(self, public_key: bytes) -> int | None:
        """Return the node id recorded for this key at this SuperLink, or None."""
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.error("session record %s cannot be read, so it is ignored: %s", self.path, error)
            return None
        if record.get("superlink") != self.status.superlink or record.get("key_sha256") != key_digest(public_key):
            return None
        return int(record["node_id"])

    def record(self, node_id: int, public_key: bytes) -> None:
        record = {"superlink": self.status.superlink, "node_id": node_id, "key_sha256": key_digest(public_key)}
        try:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(record) + "\n")
            temporary.replace(self.path)
        except OSError as error:
            # Without the record a later crash restarts slowly; the SuperNode itself still works.
            logger.error("session record %s cannot be written: %s", self.path, error)

    def close_stale_session(self, client, node_id: int) -> str:
        """Send the DeactivateNode that a killed process skipped; return closed, offline, unknown-key or failed."""
        import httpx  # pylint: disable=import-outside-toplevel
        from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=import-outside-toplevel,no-name-in-module

        try:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
        except httpx.HTTPStatusError as error:
            code = error.response.status_code
            if code == HTTP_PRECONDITION_FAILED:
                logger.info("node %s is already offline at SuperLink %s", node_id, self.status.superlink)
                return "offline"
            if code == HTTP_UNAUTHORIZED:
                logger.error("SuperLink %s does not know node %s under this key", self.status.superlink, node_id)
                return "unknown-key"
            logger.warning("closing node %s's earlier session failed with HTTP %s", node_id, code)
            return "failed"
        except httpx.TransportError as error:
            logger.warning("closing node %s's earlier session failed: %s", node_id, error)
            return "failed"
        logger.info("closed node %s's session that a previous process left open at SuperLink %s",
                    node_id, self.status.superlink)
        return "closed"

    def exit_not_registered(self, reason: str) -> None:
        logger.error(
            "SuperLink %s rejects this SuperNode's key: %s. Register the key's public half with "
            "`flwr supernode register` (the SuperNode deploy does this), then run "
            "`systemctl restart melody-supernode`; exiting with status %s, which the unit does not restart",
            self.status.superlink, reason, EXIT_NOT_REGISTERED,
        )
        self.status.update(state="not registered")
        sd_notify("STOPPING=1")
        # flwr's Runtime API server runs in a thread that SystemExit does not
        # stop, so the process ends here. The flower-superexec child exits by
        # itself when this process is gone (--parent-pid).
        logging.shutdown()
        os._exit(EXIT_NOT_REGISTERED)

    def activate(self, activate_node, client, request):
        """Call flwr's ActivateNode, reclaiming a stale session and retrying as the module describes."""
        import httpx  # pylint: disable=import-outside-toplevel

        started = time.monotonic()
        attempt = 0
        delay = 1.0
        reclaimed = False
        while True:
            attempt += 1
            try:
                response = activate_node(client, request)
            except httpx.HTTPStatusError as error:
                code = error.response.status_code
                if code not in RETRIED_STATUS_CODES:
                    raise
                logger.warning("activation attempt %d at SuperLink %s failed with HTTP %s: %s",
                               attempt, self.status.superlink, code, error.response.text[:200])
                if code == HTTP_PRECONDITION_FAILED and not reclaimed:
                    reclaimed = self.reclaim(client, request.public_key)
                    if reclaimed:
                        continue
                if time.monotonic() - started > self.lapse_seconds:
                    if code == HTTP_PRECONDITION_FAILED:
                        self.exit_not_registered(f"still rejected after {self.lapse_seconds:.0f} s")
                    raise
                self.status.update(state=f"reconnecting (attempt {attempt} failed with HTTP {code})")
                logger.info("retrying the activation in %.0f s", delay)
                self.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_SECONDS)
                continue
            self.record(response.node_id, request.public_key)
            if attempt > 1:
                logger.info("activated as node %s after %d attempts in %.1f s",
                            response.node_id, attempt, time.monotonic() - started)
            return response

    def reclaim(self, client, public_key: bytes) -> bool:
        """Close a stale session of this key; return True once the node is offline."""
        node_id = self.recorded_node_id(public_key)
        if node_id is None:
            self.exit_not_registered("this host has no node id recorded for its key")
        self.status.update(state=f"closing node {node_id}'s earlier session")
        outcome = self.close_stale_session(client, node_id)
        if outcome == "unknown-key":
            self.exit_not_registered(f"the SuperLink does not know node {node_id} under this key")
        if outcome == "closed":
            logger.info("keeping node %s offline for %.0f s so that the ServerApp sees its lost reply",
                        node_id, OFFLINE_HOLD_SECONDS)
            self.sleep(OFFLINE_HOLD_SECONDS)
        return outcome in ("closed", "offline")


def session_lapse_seconds() -> float:
    """Return how long flwr's SuperLink counts a silent node as online, plus a margin."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE  # pylint: disable=import-outside-toplevel

    return HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 10.0


def install_activation_hook(keeper: SessionKeeper) -> None:
    """Route flwr's FleetHttpClient.ActivateNode through `keeper`, where flwr has that HTTP client."""
    try:
        from flwr.supernode.fleet_http_client import FleetHttpClient  # pylint: disable=import-outside-toplevel
    except ImportError:
        # NOTE: flwr releases before the HTTP Fleet API (1.27 among them) connect over gRPC;
        # a SuperNode on those restarts after a crash without reclaiming its session.
        logger.info("this flwr has no HTTP Fleet client, so a crashed session is not reclaimed")
        return

    original = FleetHttpClient.ActivateNode

    def activate_node(client, request):
        return keeper.activate(original, client, request)

    FleetHttpClient.ActivateNode = activate_node

"""Readiness and the status line that `systemctl status melody-supernode` shows.

The unit is `Type=notify`: systemd counts the SuperNode as started only
after `READY=1`, which is sent once the SuperNode has registered with the
SuperLink, not when the process starts.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("melody_audit.notify")


def sd_notify(state: str) -> None:
    """Send one sd_notify message; outside systemd (no NOTIFY_SOCKET) it does nothing."""
    try:
        from systemd import daemon  # pylint: disable=import-outside-toplevel
    except ImportError:
        logger.error("systemd-python is missing, so this notification was not sent: %s", state)
        return
    daemon.notify(state)


class ServiceStatus:
    """The connection state and last run that the status line shows."""

    def __init__(self, superlink: str):
        self.superlink = superlink
        self.lock = threading.Lock()
        self.state = "connecting"
        self.node_id: int | None = None
        self.last_run = "none yet"
        self.ready_sent = False

    def line(self) -> str:
        node = f" as node {self.node_id}" if self.node_id is not None else ""
        return f"SuperLink {self.superlink}: {self.state}{node}; last run: {self.last_run}"

    def update(self, state: str | None = None, node_id: int | None = None, last_run: str | None = None) -> None:
        with self.lock:
            self.state = state or self.state
            self.node_id = node_id if node_id is not None else self.node_id
            self.last_run = last_run or self.last_run
            message = f"STATUS={self.line()}"
            if self.state == "connected" and not self.ready_sent:
                message = "READY=1\n" + message
                self.ready_sent = True
        sd_notify(message)

    def on_record(self, record: dict) -> None:
        """Show the run and time of the last message sent to the SuperLink."""
        self.update(last_run=f"{record['run_id']} at {record['time']} ({record['message_type']} {record['status']})")

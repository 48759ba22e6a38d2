"""Run flwr's SuperNode with its egress record and systemd notifications.

    python -m melody_audit.supernode [flower-supernode arguments]

takes the same arguments as `flower-supernode` and runs it in this process,
so signals, exit codes and `Restart=` behave as with `flower-supernode`
itself. Before it starts, two functions of flwr's SuperNode loop are
wrapped: the Fleet connection (to learn when the node has registered) and
the push of reply messages (to record each one). Both are private names of
flwr. The launcher exits on a flwr release that it has not been checked
against, so that no reply can leave unrecorded. It also wraps the node's
activation (melody_audit.session), so that a restart after a crash connects
at once and an unregistered key exits with its own status.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from importlib.metadata import version
from pathlib import Path

from .flwr_compat import CHECKED_FLWR_VERSIONS, CONNECTION_FUNCTION
from .egress import EgressRecorder, MessagePushAudit, RoundTracker
from .notify import ServiceStatus, sd_notify
from .session import SessionKeeper, install_activation_hook

logger = logging.getLogger("melody_audit.supernode")

AUDIT_DIR_ENV = "MELODY_AUDIT_DIR"
# Exit code when the egress record cannot be set up; systemd's Restart=
# retries it like any other failure.
EXIT_AUDIT_UNAVAILABLE = 3


def configure_logging() -> None:
    # flwr's own logger has its handler; this package logs beside it to stderr,
    # which systemd puts in the unit's journal.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("melody_audit")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False


def superlink_address(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--superlink", default="127.0.0.1:9092")
    known, _ = parser.parse_known_args(argv)
    return known.superlink


def install_hooks(recorder: EgressRecorder, status: ServiceStatus, flwr_version: str = "1.42.0") -> None:
    """Wrap flwr's Fleet connection and reply push with the audit's recorders."""
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree  # pylint: disable=import-outside-toplevel
    from flwr.supernode import start_client_internal as loop  # pylint: disable=import-outside-toplevel

    connection_function = CONNECTION_FUNCTION[flwr_version]
    original_connection = getattr(loop, connection_function)
    original_push_messages = loop._push_messages  # pylint: disable=protected-access
    connection = {"node_id": None}
    rounds = RoundTracker()

    def tree_order(object_tree) -> list[str]:
        return [tree.object_id for tree in iterate_object_tree(object_tree)]

    def wrap_receive(receive):
        def audited_receive():
            received = receive()
            if received is not None:
                message, object_tree = received
                rounds.note_instruction(message.metadata.message_id, tree_order(object_tree))
            return received

        return audited_receive

    def wrap_pull_object(pull_object):
        def audited_pull_object(run_id, object_id):
            content = pull_object(run_id, object_id)
            try:
                rounds.note_object(object_id, content)
            except Exception as error:  # pylint: disable=broad-except
                # A round that cannot be read must not stop the SuperNode; the record keeps round ''.
                logger.error("round of object %s in run %s could not be read: %s", object_id, run_id, error)
            return content

        return audited_pull_object

    @contextlib.contextmanager
    def audited_connection(*args, **kwargs):
        with original_connection(*args, **kwargs) as conn:
            node_id, receive, send, get_run, get_fab, pull_object, push_object, confirm = conn
            connection["node_id"] = node_id
            logger.info("registered with SuperLink %s as node %s", status.superlink, node_id)
            status.update(state="connected", node_id=node_id)
            yield (node_id, wrap_receive(receive), send, get_run, get_fab, wrap_pull_object(pull_object),
                   push_object, confirm)
        status.update(state="disconnected")

    def audited_push_messages(*, state, object_store, send, push_object):
        audit = MessagePushAudit(recorder, connection["node_id"], tree_order, rounds)
        try:
            original_push_messages(
                state=state,
                object_store=object_store,
                send=audit.wrap_send(send),
                push_object=audit.wrap_push_object(push_object),
            )
        finally:
            audit.write_records()

    setattr(loop, connection_function, audited_connection)
    loop._push_messages = audited_push_messages  # pylint: disable=protected-access


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging()

    flwr_version = version("flwr")
    if flwr_version not in CHECKED_FLWR_VERSIONS:
        logger.error(
            "flwr %s is not one of the releases the egress record was checked against (%s); "
            "install one of those, or check and extend melody_audit first",
            flwr_version, ", ".join(CHECKED_FLWR_VERSIONS),
        )
        sys.exit(EXIT_AUDIT_UNAVAILABLE)

    audit_dir = os.environ.get(AUDIT_DIR_ENV)
    if not audit_dir:
        logger.error("%s is not set; set it to a folder the service may write, such as its state folder", AUDIT_DIR_ENV)
        sys.exit(EXIT_AUDIT_UNAVAILABLE)

    status = ServiceStatus(superlink_address(argv))
    try:
        recorder = EgressRecorder(Path(audit_dir), status.superlink, on_record=status.on_record)
    except OSError as error:
        logger.error("egress record folder %s cannot be used: %s", audit_dir, error)
        sys.exit(EXIT_AUDIT_UNAVAILABLE)
    install_hooks(recorder, status, flwr_version)
    # A restart after a crash reclaims the session that the killed process left open.
    install_activation_hook(SessionKeeper(Path(audit_dir), status))
    status.update()

    from flwr.supernode.cli import flower_supernode  # pylint: disable=import-outside-toplevel

    logger.info("starting the flwr %s SuperNode for SuperLink %s", flwr_version, status.superlink)
    sys.argv = ["flower-supernode", *argv]
    try:
        flower_supernode()
    finally:
        sd_notify("STOPPING=1")


if __name__ == "__main__":
    main()

"""Differences between the flwr releases that the SuperNode launcher wraps.

The launcher wraps two private parts of `flwr.supernode.start_client_internal`:
the function that opens the Fleet connection, and `_push_messages`. Read from
the source of each release listed here:

- flwr 1.42.0 connects with `http_request_response`; its `send` returns
  `(object_ids, session_id)` and its `push_object` takes
  `(run_id, session_id, object_id, content)`.
- flwr 1.27.0 connects with `grpc_request_response` (the default `grpc-rere`
  transport); its `send` returns the object ids alone and its `push_object`
  takes `(run_id, object_id, content)`. Both yield the same 8 connection
  functions, and `_push_messages` takes the same keyword arguments.
"""

from __future__ import annotations

# flwr releases whose `start_client_internal` module was read and run with
# the wrappers in melody_audit.supernode.
CHECKED_FLWR_VERSIONS = ("1.27.0", "1.42.0")

# Name, in `flwr.supernode.start_client_internal`, of the function that opens
# the Fleet connection. NOTE: flwr 1.27 with `--rest` imports its connection
# inside a function, where the launcher cannot wrap it; the deploy never
# passes `--rest`.
CONNECTION_FUNCTION = {
    "1.27.0": "grpc_request_response",
    "1.42.0": "http_request_response",
}


def sent_object_ids(send_result) -> set[str]:
    """Return the ids of the objects still to upload, from the result of a release's `send`."""
    if isinstance(send_result, tuple):
        return send_result[0]
    return send_result

"""Audit trail of a MELODY SuperNode: what left the site, and whether it is connected.

Installed into the SuperNode's venv from the offline wheelhouse. The
launcher (`python -m melody_audit.supernode`) runs flwr's SuperNode in its
own process, records every reply message that the SuperNode pushes to the
SuperLink, and reports readiness and status to systemd.
"""

__version__ = "0.1.0"

"""Shell scripts that lab tests run on a SuperNode host."""

from __future__ import annotations

import textwrap


def unregistered_supernode(launcher: str, audit: bool = False) -> str:
    """Return a script that starts `launcher` as the service user with a fresh key the SuperLink never registered.

    `launcher` runs from the venv of the deployed SuperNode unit, with the
    lab's CA, and the script exits with its status. With `audit`, the
    launcher gets an egress record folder of its own.
    """
    audit_setup = 'mkdir "$folder/audit"' if audit else ":"
    audit_env = ' MELODY_AUDIT_DIR="$folder/audit"' if audit else ""
    return textwrap.dedent(f"""\
        set -u
        folder=$(mktemp -d)
        ssh-keygen -q -t ecdsa -b 256 -N '' -f "$folder/key"
        {audit_setup}
        chown -R melody:melody "$folder"
        venv=$(grep -o '/opt/melody/venvs/[^/ ]*' /etc/systemd/system/melody-supernode.service | head -1)
        timeout 90 runuser -u melody -- env FLWR_HOME="$folder" FLWR_TELEMETRY_ENABLED=0 \\
            FLWR_DISABLE_UPDATE_CHECK=1 PATH="$venv/bin:/usr/bin:/bin"{audit_env} {launcher} \\
            --superlink superlink:8000 --root-certificates /etc/melody/tls/ca.pem \\
            --auth-supernode-private-key "$folder/key" --host 127.0.0.1 --port 9199 \\
            --isolation subprocess 2>&1
        code=$?
        rm -rf "$folder"
        exit $code
    """)

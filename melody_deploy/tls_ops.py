"""Operations that put the TLS files on the hosts."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files

from .plan import HostPlan
from .units import REMOTE_TLS, REMOTE_TLS_DIR


@deploy("TLS files")
def install_tls_files(plan: HostPlan, server: bool) -> list:
    """Upload the CA certificate, and with `server` the SuperLink's certificate and key.

    The folder is readable by root and the service group only, and the key is
    uploaded through a temporary file inside it, so no other user can read
    the key at any moment. Return the upload operations.
    """
    group = plan.settings["melody_service_user"]
    files.directory(name=f"{REMOTE_TLS_DIR} exists", path=REMOTE_TLS_DIR,
                    user="root", group=group, mode="0750")
    uploads = [files.put(
        name=f"{REMOTE_TLS.ca_certificate} is the federation's CA",
        src=str(plan.tls.ca_cert), dest=REMOTE_TLS.ca_certificate,
        user="root", group="root", mode="0644",
    )]
    if server:
        uploads.append(files.put(
            name=f"{REMOTE_TLS.certificate} is the SuperLink's certificate",
            src=str(plan.tls.server_cert), dest=REMOTE_TLS.certificate,
            user="root", group="root", mode="0644",
        ))
        uploads.append(files.put(
            name=f"{REMOTE_TLS.key} is the SuperLink's key, readable by {group} only",
            src=str(plan.tls.server_key), dest=REMOTE_TLS.key,
            user="root", group=group, mode="0640",
            _temp_dir=REMOTE_TLS_DIR,
        ))
    return uploads

"""Remove the MELODY services: `pyinfra INVENTORY deploy/teardown.py`.

Acts on the SuperLink and every SuperNode of the inventory. Stops, disables
and deletes the units (with the SuperLink's backup timer and nginx Fleet
front), then deletes the venvs, wheelhouses, TLS files, the researchers'
tunnel user and the service user. The SuperLink's state database and logs and the SuperNodes' state
folders stay unless `melody_teardown_purge` is True; a site's data folder is
never touched. Deploying again afterwards restores the federation with its
kept runs.
"""

from melody_deploy.teardown import (
    keep_or_purge_state,
    prepare_teardown,
    remove_install,
    remove_service,
    remove_service_user,
    remove_superlink_extras,
    remove_tls_files,
    unit_for,
)
from melody_deploy.settings import SUPERLINK

resolved = prepare_teardown()

if resolved is not None:
    remove_service(unit_for(resolved))
    if resolved.role == SUPERLINK:
        remove_superlink_extras(resolved)
    remove_install(resolved)
    remove_tls_files()
    remove_service_user(resolved)
    keep_or_purge_state(resolved)

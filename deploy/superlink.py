"""Deploy the Flower SuperLink: `pyinfra INVENTORY deploy/superlink.py`.

Acts on the host in the inventory's `superlink` group and leaves the others
alone. Preflight checks the whole inventory and the host before any change.
"""

from melody_deploy.backup import install_database_backup
from melody_deploy.control_access import install_control_access
from melody_deploy.fleet_front import install_fleet_front, remove_fleet_front
from melody_deploy.install import install_service_user, install_venv
from melody_deploy.plan import prepare
from melody_deploy.service import superlink_check_script
from melody_deploy.settings import SUPERLINK
from melody_deploy.tls_ops import install_tls_files
from melody_deploy.units import SUPERLINK_UNIT, render_superlink_unit, storage_dirs
from melody_deploy.upgrade import switch_service

plan = prepare(SUPERLINK)

if plan is not None:
    state_dir = plan.settings["melody_superlink_state_dir"]
    install_service_user(
        plan,
        home=state_dir,
        folders=[
            state_dir,
            f"{state_dir}/flwr",
            plan.settings["melody_superlink_log_dir"],
            plan.settings["melody_superlink_backup_dir"],
            *storage_dirs(plan.settings),
        ],
    )
    venv = install_venv(plan)

    # Security: TLS files and the Control API's access rules. Without TLS, or
    # on flwr releases whose own Fleet listener takes the public port, an
    # earlier nginx front must go.
    tls_files = []
    if plan.tls is not None:
        tls_files = install_tls_files(plan, server=True)
        install_control_access(plan)
    if not plan.fleet_front:
        remove_fleet_front()

    switch_service(
        plan,
        SUPERLINK_UNIT,
        render_superlink_unit(plan.host, plan.paths, plan.flags),
        changes=[venv, *tls_files],
        check_script=superlink_check_script(SUPERLINK_UNIT, plan.listen_port),
        database=f"{state_dir}/state.db",
    )
    install_database_backup(plan)

    # Security: nginx publishes the Fleet API only, after the SuperLink runs.
    if plan.fleet_front:
        install_fleet_front(plan, changes=tls_files)

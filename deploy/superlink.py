"""Deploy the Flower SuperLink: `pyinfra INVENTORY deploy/superlink.py`.

Acts on the host in the inventory's `superlink` group and leaves the others
alone. Preflight checks the whole inventory and the host before any change.
"""

from melody_deploy.backup import install_database_backup
from melody_deploy.install import install_service_user, install_venv
from melody_deploy.plan import prepare
from melody_deploy.service import install_unit, run_service, superlink_check_script
from melody_deploy.settings import SUPERLINK
from melody_deploy.units import SUPERLINK_UNIT, render_superlink_unit

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
        ],
    )
    venv = install_venv(plan)
    unit = install_unit(SUPERLINK_UNIT, render_superlink_unit(plan.host, plan.paths))
    run_service(
        SUPERLINK_UNIT,
        changes=[venv, unit],
        check_script=superlink_check_script(SUPERLINK_UNIT, plan.settings["melody_superlink_port"]),
    )
    install_database_backup(plan)

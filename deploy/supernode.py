"""Deploy a Flower SuperNode on each site: `pyinfra INVENTORY deploy/supernode.py`.

Acts on the hosts in the inventory's `supernodes` group and leaves the others
alone. Preflight checks the whole inventory and each host before any change.
The site's data folder is only checked, never written.
"""

from melody_deploy.install import install_service_user, install_venv
from melody_deploy.plan import prepare
from melody_deploy.service import supernode_check_script
from melody_deploy.settings import SUPERNODE
from melody_deploy.supernode_auth import register_supernode
from melody_deploy.tls_ops import install_tls_files
from melody_deploy.units import AUDIT_SUBDIR, SUPERNODE_UNIT, render_supernode_unit
from melody_deploy.upgrade import switch_service

# flwr logs this once the SuperNode has registered with the SuperLink.
CONNECTED_LOG_LINE = "SuperNode ID:"

plan = prepare(SUPERNODE)

if plan is not None:
    state_dir = plan.settings["melody_supernode_state_dir"]
    install_service_user(
        plan, home=state_dir, folders=[state_dir, f"{state_dir}/flwr", f"{state_dir}/{AUDIT_SUBDIR}"],
    )
    venv = install_venv(plan)

    # Security: the CA, and this SuperNode's key registered with the SuperLink.
    security = []
    if plan.tls is not None:
        security = [*install_tls_files(plan, server=False), register_supernode(plan)]

    switch_service(
        plan,
        SUPERNODE_UNIT,
        render_supernode_unit(plan.host, plan.paths, plan.egress_addresses, plan.flags),
        changes=[venv, *security],
        check_script=supernode_check_script(SUPERNODE_UNIT, CONNECTED_LOG_LINE),
    )

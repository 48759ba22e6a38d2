"""Access to the SuperLink's Control API: researchers' SSH tunnels, and the deploy on the host.

The SuperLink serves the Control API only on loopback. A researcher reaches
it with `ssh -N -L PORT:127.0.0.1:INTERNAL_PORT CONTROL_USER@SUPERLINK`: the
control user has no shell, and each researcher key in its authorized_keys may
only forward to that one port, and only from the researcher networks.
"""

from __future__ import annotations

from io import StringIO

import tomli_w
from pyinfra.api import deploy
from pyinfra.operations import files, server

from .plan import HostPlan
from .units import REMOTE_TLS, render

# The deploy's own connection to the Control API, used on the SuperLink host
# to register SuperNodes.
LOCAL_CONNECTION = "local"


def control_home(settings: dict) -> str:
    return f"/var/lib/{settings['melody_control_user']}"


def authorized_keys(settings: dict) -> str:
    """Return the control user's authorized_keys: forwarding to the Control API only."""
    target = f"127.0.0.1:{settings['melody_superlink_internal_port']}"
    networks = ",".join(settings["melody_researcher_networks"])
    lines = [
        "# Managed by melody-provisioning (deploy/superlink.py); local edits are overwritten.",
        f"# Researchers' keys: port forwarding to the Control API at {target} only.",
    ]
    if not networks:
        lines.append("# melody_researcher_networks is empty, so no key may log in.")
        return "\n".join(lines) + "\n"
    options = f'restrict,port-forwarding,permitopen="{target}",from="{networks}",command="/bin/false"'
    for key in settings["melody_researcher_ssh_keys"]:
        lines.append(f"{options} {key.strip()}")
    return "\n".join(lines) + "\n"


def local_cli_config(settings: dict) -> str:
    entry = {
        "address": f"127.0.0.1:{settings['melody_superlink_internal_port']}",
        "root-certificates": REMOTE_TLS.ca_certificate,
    }
    return tomli_w.dumps({"superlink": {LOCAL_CONNECTION: entry}})


def register_script_path(settings: dict) -> str:
    return f"{settings['melody_install_dir']}/bin/melody-register-supernode"


@deploy("Control API access")
def install_control_access(plan: HostPlan) -> None:
    """Create the tunnel-only control user, its keys, and the on-host registration tool."""
    settings = plan.settings
    user = settings["melody_control_user"]
    home = control_home(settings)

    server.group(name=f"group {user} exists", group=user, system=True)
    server.user(
        name=f"system user {user} exists for researchers' SSH tunnels, without a login shell",
        user=user, group=user, system=True, shell="/usr/sbin/nologin",
        home=home, create_home=False, ensure_home=False,
    )
    # Owned by root, so the tunnel user cannot change its own keys; sshd
    # accepts root-owned folders and files here.
    files.directory(name=f"{home}/.ssh exists, owned by root", path=f"{home}/.ssh",
                    user="root", group="root", mode="0755")
    files.directory(name=f"{home} is owned by root", path=home, user="root", group="root", mode="0755")
    files.put(
        name=f"{home}/.ssh/authorized_keys allows tunnels to the Control API only",
        src=StringIO(authorized_keys(settings)), dest=f"{home}/.ssh/authorized_keys",
        user="root", group="root", mode="0644",
    )

    service_user = settings["melody_service_user"]
    cli_home = f"{settings['melody_superlink_state_dir']}/control-cli"
    files.directory(name=f"{cli_home} exists", path=cli_home, user=service_user, group=service_user, mode="0750")
    files.put(
        name=f"{cli_home}/config.toml connects to the Control API on loopback",
        src=StringIO(local_cli_config(settings)), dest=f"{cli_home}/config.toml",
        user=service_user, group=service_user, mode="0640",
    )
    files.directory(name=f"{settings['melody_install_dir']}/bin exists",
                    path=f"{settings['melody_install_dir']}/bin", user="root", group="root", mode="0755")
    files.put(
        name=f"{register_script_path(settings)} registers SuperNodes",
        src=StringIO(render("melody-register-supernode.j2", {
            "user": service_user,
            "flwr_home": cli_home,
            "flwr": f"{plan.paths.venv}/bin/flwr",
        })),
        dest=register_script_path(settings), user="root", group="root", mode="0750",
    )

"""Operations that install the service user, folders and the offline venv."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.facts.files import File
from pyinfra.operations import files, server

from .plan import HostPlan
from .wheelhouse import LOCK_FILE


class OrphanedFiles(FactBase):
    """
    Whether any of the folders contains files whose owner no longer exists, such
    as the state that a teardown kept after it removed the service user.

    .. code:: python

        True
    """

    def command(self, paths: tuple[str, ...]) -> str:
        return f"find {' '.join(paths)} -nouser -print -quit 2>/dev/null | grep -q . && echo yes || echo no"

    def process(self, output):
        return "".join(output).strip() == "yes"


@deploy("Service user and folders")
def install_service_user(plan: HostPlan, home: str, folders: list[str]) -> None:
    """Create the system user and group, and the folders it owns."""
    user = plan.settings["melody_service_user"]

    server.group(name=f"group {user} exists", group=user, system=True)
    server.user(
        name=f"system user {user} exists without a login shell",
        user=user,
        group=user,
        system=True,
        shell="/usr/sbin/nologin",
        home=home,
        create_home=False,
        ensure_home=False,
    )
    for folder in folders:
        files.directory(
            name=f"{folder} is owned by {user}",
            path=folder,
            user=user,
            group=user,
            mode="0750",
        )

    # The user that a teardown removed may come back with another uid. One
    # fact for all folders keeps a no-op deploy to one extra SSH command.
    if host.get_fact(OrphanedFiles, paths=tuple(folders)):
        server.shell(
            name=f"files kept in {', '.join(folders)} from an earlier install belong to {user} again",
            commands=[f"find {' '.join(folders)} -nouser -exec chown -h {user}:{user} {{}} +"],
        )


def venv_install_script(plan: HostPlan) -> str:
    """Shell script that (re)creates the venv from the uploaded wheelhouse.

    The marker file is written last, so an interrupted install is redone on
    the next run instead of being taken for a finished one.
    """
    venv = plan.paths.venv
    wheels = plan.paths.wheelhouse
    version = plan.settings["melody_flwr_version"]
    return "\n".join([
        "set -eu",
        f"rm -rf {venv}",
        f"python3 -m venv {venv}",
        f"{venv}/bin/python -m pip install --quiet --no-index --no-cache-dir "
        f"--disable-pip-version-check --require-hashes "
        f"--find-links {wheels} --requirement {wheels}/{LOCK_FILE}",
        # Fail here, not at service start, if the venv contains another flwr.
        f"""installed=$({venv}/bin/python -c "import importlib.metadata as m; print(m.version('flwr'))")""",
        f'test "$installed" = {version} || {{ echo "venv has flwr $installed, expected {version}" >&2; exit 1; }}',
        f"{venv}/bin/python -c 'import torch, numpy, PIL, melody_audit.supernode, systemd.journal'",
        f"echo {plan.wheelhouse.wheelhouse_id} > {plan.paths.venv_marker}",
    ])


@deploy("Offline Python venv")
def install_venv(plan: HostPlan):
    """Upload the wheelhouse and install the venv, unless it is installed already.

    Return the install operation, or None when the venv was already there.
    """
    install_dir = plan.settings["melody_install_dir"]
    files.directory(name=f"{install_dir} exists", path=install_dir, user="root", group="root", mode="0755")

    # The venv folder is named after the wheelhouse's content hash, so a
    # finished install with that name contains exactly these wheels.
    if host.get_fact(File, path=plan.paths.venv_marker):
        host.noop(f"venv {plan.paths.venv} is installed")
        return None

    files.sync(
        name=f"wheelhouse {plan.wheelhouse.wheelhouse_id} is uploaded to {plan.paths.wheelhouse}",
        src=str(plan.wheelhouse.path),
        dest=plan.paths.wheelhouse,
        user="root",
        group="root",
        mode="0644",
        dir_mode="0755",
    )
    return server.shell(
        name=f"venv {plan.paths.venv} is installed with flwr {plan.settings['melody_flwr_version']}",
        commands=[venv_install_script(plan)],
    )

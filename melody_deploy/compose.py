"""The Docker Compose example: its compose.yml and .env, rendered from the deploy's own settings.

    python -m melody_deploy.compose render            # rewrite docker/compose_example/compose.yml
    python -m melody_deploy.compose up --site DIR --site DIR [--run-dir DIR]
    python -m melody_deploy.compose flwr run /srv/melody/app compose --stream
    python -m melody_deploy.compose down [--run-dir DIR] [--volumes]

Ports, audit options, paths and the flwr version come from
melody_deploy/settings.py and the command lines from flwr_cli.py and
units.py, as in the pyinfra deploy, so the two cannot drift apart. What
differs between Docker hosts (image tag, site folders, TLS and key folders)
is in the .env file that `up` writes, not in compose.yml.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from . import flwr_cli, tls, units
from .compose_images import SERVICE_UID
from .preflight import Federation, HostSpec, validate_inventory

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO_ROOT / "docker" / "compose_example"
COMPOSE_FILE = COMPOSE_DIR / "compose.yml"
TEMPLATE = "compose.yml.j2"

SUPERLINK_SERVICE = "superlink"
SUPERNODE_SERVICES = ("supernode-1", "supernode-2")
RESEARCHER_SERVICE = "researcher"
# The researcher's Flower connection to the SuperLink, by its service name.
CONNECTION = "compose"
# Mount point of each SuperNode's site images, read-only.
CONTAINER_DATA_DIR = "/srv/melody/data"

# Mount points of the app (read-only) and of the Flower home in the researcher's container.
CONTAINER_APP_DIR = "/srv/melody/app"
RESEARCHER_HOME = "/var/lib/melody-researcher"
DEFAULT_PROJECT = "melody"


def federation() -> Federation:
    """Return the example's federation, checked by the deploy's own preflight."""
    specs = [HostSpec(SUPERLINK_SERVICE, ("superlink",), {})]
    for partition_id, name in enumerate(SUPERNODE_SERVICES):
        specs.append(HostSpec(name, ("supernodes",), {
            "melody_partition_id": partition_id,
            "melody_data_dir": CONTAINER_DATA_DIR,
        }))
    return validate_inventory(specs)


def image_settings() -> dict:
    """Return the settings the one service image is built from: both roles' folders and software."""
    resolved = federation()
    return {**resolved.supernodes[0].settings, **resolved.superlink.settings}


def env_name(service: str, suffix: str) -> str:
    """Return the .env variable of a service's value, such as MELODY_SUPERNODE_1_DATA."""
    return f"MELODY_{service.upper().replace('-', '_')}_{suffix}"


def without_path(environment: dict[str, str]) -> dict[str, str]:
    # The image's own PATH names its venv, whose folder changes with the wheelhouse.
    return {key: value for key, value in environment.items() if key != "PATH"}


@dataclass(frozen=True)
class Service:
    """One service's values for the template."""

    name: str
    command: list[str]
    environment: dict[str, str]
    state_dir: str
    mounts: list[str]
    working_dir: str = ""
    log_dir: str = ""
    app_dir: str = ""
    connection: str = ""


def superlink_service(settings: dict) -> Service:
    state_dir = settings["melody_superlink_state_dir"]
    log_dir = settings["melody_superlink_log_dir"]
    # In the pyinfra deploy nginx publishes the Fleet API and the SuperLink
    # listens on loopback. Compose has no nginx, so the SuperLink itself
    # serves TLS on its port, on the internal network only.
    flags = units.release_flags(settings, None)
    public = {"--host": "0.0.0.0", "--port": str(settings["melody_superlink_port"])}
    options = [dataclasses.replace(option, value=public[option.flag]) if option.flag in public else option
               for option in flwr_cli.superlink_options(settings, flags, units.REMOTE_TLS)]
    args = flwr_cli.render_args("flower-superlink", flags.version, options, flags.superlink)
    tls_files = ((tls.CA_CERT, units.REMOTE_TLS.ca_certificate), (tls.SERVER_CERT, units.REMOTE_TLS.certificate),
                 (tls.SERVER_KEY, units.REMOTE_TLS.key))
    return Service(
        name=SUPERLINK_SERVICE,
        command=["flower-superlink", *[word for arg in args for word in shlex.split(arg)]],
        environment=without_path(units.environment(settings, "", f"{state_dir}/flwr")),
        state_dir=state_dir,
        mounts=[f"${{MELODY_TLS_DIR:?set in .env}}/{source}:{target}:ro" for source, target in tls_files],
        working_dir=state_dir,
        log_dir=log_dir,
    )


def supernode_service(host) -> Service:
    settings = host.settings
    state_dir = settings["melody_supernode_state_dir"]
    # The unit's own values: its arguments and the audit launcher's environment.
    context = units.supernode_context(host, units.host_paths(settings, "image"))
    audited = units.audited_supernode("", state_dir)
    data_variable = env_name(host.name, "DATA")
    return Service(
        name=host.name,
        command=["python", "-m", "melody_audit.supernode", *[word for arg in context["args"] for word in shlex.split(arg)]],
        environment=without_path(audited["environment"]),
        state_dir=state_dir,
        mounts=[
            f"${{{data_variable}:?set in .env}}:{settings['melody_data_dir']}:ro",
            f"${{MELODY_TLS_DIR:?set in .env}}/{tls.CA_CERT}:{units.REMOTE_TLS.ca_certificate}:ro",
            f"${{MELODY_KEYS_DIR:?set in .env}}/{host.name}.key:{units.supernode_key_path(settings)}:ro",
        ],
    )


def researcher_service(settings: dict) -> Service:
    # Its Flower home is a folder of the Docker host, where `up` writes the
    # connection; the CLI also keeps its own files there.
    return Service(
        name=RESEARCHER_SERVICE,
        command=["flwr", "--help"],
        environment=without_path(units.environment(settings, "", RESEARCHER_HOME)),
        state_dir=RESEARCHER_HOME,
        mounts=[
            f"${{MELODY_RESEARCHER_HOME:?set in .env}}:{RESEARCHER_HOME}",
            f"${{MELODY_APP_DIR:?set in .env}}:{CONTAINER_APP_DIR}:ro",
            f"${{MELODY_TLS_DIR:?set in .env}}/{tls.CA_CERT}:{units.REMOTE_TLS.ca_certificate}:ro",
        ],
        app_dir=CONTAINER_APP_DIR,
        connection=CONNECTION,
    )


def render_compose() -> str:
    resolved = federation()
    return units.render(TEMPLATE, {
        "flwr_version": resolved.superlink.settings["melody_flwr_version"],
        "uid": SERVICE_UID,
        "superlink": superlink_service(resolved.superlink.settings),
        "supernodes": [supernode_service(host) for host in resolved.supernodes],
        "researcher": researcher_service(resolved.superlink.settings),
    })


def render_env(*, project: str, image: str, tls_dir: Path, keys_dir: Path, researcher_home: Path,
               sites: list[Path], app_dir: Path = REPO_ROOT / "melody_app") -> str:
    """Return the .env file for compose.yml on this Docker host."""
    if len(sites) != len(SUPERNODE_SERVICES):
        raise ValueError(f"give one --site folder per SuperNode ({len(SUPERNODE_SERVICES)}), got {len(sites)}")
    lines = [
        "# Written by `python -m melody_deploy.compose up` for this Docker host.",
        f"COMPOSE_PROJECT_NAME={project}",
        f"MELODY_IMAGE={image}",
        f"MELODY_TLS_DIR={tls_dir}",
        f"MELODY_KEYS_DIR={keys_dir}",
        f"MELODY_RESEARCHER_HOME={researcher_home}",
        f"MELODY_APP_DIR={app_dir}",
    ]
    for name, site in zip(SUPERNODE_SERVICES, sites):
        lines.append(f"{env_name(name, 'DATA')}={site}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m melody_deploy.compose", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help=f"rewrite {COMPOSE_FILE.relative_to(REPO_ROOT)} from the settings")
    render.add_argument("--check", action="store_true", help="exit 1 when the committed file differs")
    up = commands.add_parser("up", help="build the images, write .env, TLS files and keys, start the services")
    up.add_argument("--site", action="append", type=Path, required=True, help="a SuperNode's data folder (twice)")
    up.add_argument("--rootfs", type=Path, help="root filesystem archive (default: the lab's, built if missing)")
    flwr = commands.add_parser("flwr", help="run the researcher's flwr CLI in the researcher service")
    flwr.add_argument("arguments", nargs=argparse.REMAINDER)
    down = commands.add_parser("down", help="stop and remove the services; --volumes also deletes their state")
    down.add_argument("--volumes", action="store_true")
    for command in (up, flwr, down):
        command.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".cache" / "compose",
                             help="folder for .env, TLS files, keys and the researcher's Flower home")
        command.add_argument("--project", default=DEFAULT_PROJECT, help="Compose project name")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if arguments.command == "render":
        text = render_compose()
        if arguments.check:
            same = COMPOSE_FILE.exists() and COMPOSE_FILE.read_text() == text
            print(f"{COMPOSE_FILE}: {'up to date' if same else 'differs from the settings; run render'}")
            return 0 if same else 1
        COMPOSE_FILE.write_text(text)
        print(f"wrote {COMPOSE_FILE}")
        return 0

    from . import compose_stack  # pylint: disable=import-outside-toplevel

    stack = compose_stack.Stack(run_dir=arguments.run_dir.resolve(), project=arguments.project)
    try:
        if arguments.command == "up":
            stack.up(sites=[site.resolve() for site in arguments.site], rootfs=arguments.rootfs)
            print(f"both SuperNodes are online; submit a run with:\n  .venv/bin/python -m melody_deploy.compose "
                  f"flwr run {CONTAINER_APP_DIR} {CONNECTION} --stream")
        elif arguments.command == "flwr":
            result = stack.flwr(*arguments.arguments, timeout=None)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            return result.returncode
        else:
            stack.down(volumes=arguments.volumes)
    except (compose_stack.StackError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

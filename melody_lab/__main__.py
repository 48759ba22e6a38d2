"""Command line of the lab: `python -m melody_lab up|down|status`."""

import argparse
import logging
import sys
from pathlib import Path

from melody_lab import lab, power, settings
from melody_lab.data import DatasetError
from melody_lab.network import NetworkError
from melody_lab.plan import PlanError
from melody_lab.rootfs import RootfsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m melody_lab",
        description="Start or stop a lab of real systemd hosts (one superlink, N supernodes) "
                    "in systemd-nspawn containers on this machine.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every SSH retry")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the lab, or do nothing when the same lab is already up")
    up.add_argument("--supernodes", type=int, default=settings.DEFAULT_SUPERNODES,
                    help=f"number of supernode hosts, 1 to {settings.MAX_SUPERNODES} "
                         f"(default {settings.DEFAULT_SUPERNODES})")
    up.add_argument("--subnet", default=settings.DEFAULT_SUBNET,
                    help=f"private IPv4 subnet of the lab bridge, /27 or larger (default {settings.DEFAULT_SUBNET})")
    up.add_argument("--dataset", type=Path, default=None,
                    help=f"image dataset folder with labels.csv to shard over the supernodes "
                         f"(default {settings.default_dataset()})")
    up.add_argument("--mirror", default=None,
                    help="Debian mirror URL for building the root filesystem (default: the one apt on this machine uses)")
    up.add_argument("--boot-timeout", type=float, default=120,
                    help="seconds to wait for each host to reach the running state (default 120)")
    up.add_argument("--keep-on-failure", action="store_true",
                    help="leave a lab that failed to boot in place for inspection")

    down = commands.add_parser("down", help="stop the lab and remove its hosts, mounts, cgroups and bridge")
    down.add_argument("--purge", action="store_true", help="also delete the lab's SSH keys and console logs")

    commands.add_parser("status", help="show each host's PID, system state and memory; exit 1 unless all run")

    for name, meaning in (("reboot", "power-cycle"), ("stop", "power off"), ("start", "boot again")):
        power_command = commands.add_parser(name, help=f"{meaning} lab hosts, keeping their disks (default: all)")
        power_command.add_argument("hosts", nargs="*", help="host names, such as superlink supernode-1")
    return parser


def print_status() -> int:
    records = lab.status()
    if not records:
        print("no lab is up")
        return 1
    print(f"{'HOST':<13} {'ADDRESS':<15} {'PID':>8}  {'STATE':<12} {'PSS':>9}")
    for record in records:
        print(f"{record['name']:<13} {record['address']:<15} {record['pid'] or '-':>8}  "
              f"{record['system_state']:<12} {record['memory_kib'] / 1024:>6.0f} MiB")
    return 0 if all(record["system_state"] == "running" for record in records) else 1


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if arguments.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if arguments.command == "up":
            state = lab.up(supernodes=arguments.supernodes, subnet=arguments.subnet,
                           dataset=arguments.dataset, mirror=arguments.mirror,
                           boot_timeout=arguments.boot_timeout, keep_on_failure=arguments.keep_on_failure)
            for host in state.hosts:
                print(f"{host.name:<13} {host.address:<15} pid {host.pid}")
            print(f"state: {lab.settings.state_dir() / lab.STATE_FILE}")
            return 0
        if arguments.command in ("reboot", "stop", "start"):
            getattr(power, arguments.command)(arguments.hosts)
            return print_status() if arguments.command != "stop" else 0
        if arguments.command == "down":
            lab.down(purge=arguments.purge)
            return 0
        return print_status()
    except (lab.LabError, PlanError, DatasetError, NetworkError, RootfsError) as error:
        logging.getLogger("melody_lab").error("%s failed: %s", arguments.command, error)
        return 1


if __name__ == "__main__":
    sys.exit(main())

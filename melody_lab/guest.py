"""Files that the lab writes into a host's overlay before it boots.

They make the host unique (name, address, SSH host key) and reachable
(networkd on host0, /etc/hosts, root's authorized key). Writes go through the
mounted overlay, so they land in the host's upper dir with correct copy-up.
"""

import os
import shutil
from pathlib import Path

from melody_lab.plan import HostPlan


def guest_path(root: Path, path: str) -> Path:
    """Return `path` inside the host tree at `root`, raising if a parent folder is a symlink.

    A symlink in the guest tree would otherwise send a write from this machine
    to a file outside the host.
    """
    target = root / path.lstrip("/")
    for parent in reversed(target.relative_to(root).parents):
        if (root / parent).is_symlink():
            raise RuntimeError(f"cannot write {path} into {root}: {parent} is a symlink")
    if target.is_symlink():
        target.unlink()
    return target


def write_file(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    """Write a root-owned file into the host tree."""
    target = guest_path(root, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    os.chmod(target, mode)
    os.chown(target, 0, 0)


def hosts_file(hosts: list[HostPlan]) -> str:
    """Return /etc/hosts content that names every lab host."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", ""]
    lines += [f"{host.address}\t{host.name}" for host in hosts]
    return "\n".join(lines) + "\n"


def network_file(host: HostPlan, prefix_length: int) -> str:
    """Return a systemd-networkd file that gives host0 a static address and no gateway."""
    # No Gateway= line on purpose: without a default route, a lab host can
    # only reach the lab subnet.
    return (
        "# Written by melody_lab: static lab address and no default route.\n"
        "[Match]\n"
        "Name=host0\n"
        "\n"
        "[Network]\n"
        f"Address={host.address}/{prefix_length}\n"
        "LinkLocalAddressing=no\n"
        "IPv6AcceptRA=no\n"
    )


def prepare(root: Path, host: HostPlan, hosts: list[HostPlan], prefix_length: int,
            client_public_key: str, host_key: Path) -> None:
    """Write the host's identity, network, name resolution and SSH access into its tree."""
    write_file(root, "/etc/hostname", f"{host.name}\n")
    write_file(root, "/etc/hosts", hosts_file(hosts))
    # Sorts before the image's 80-container-host0.network, which would ask DHCP.
    write_file(root, "/etc/systemd/network/10-lab-host0.network", network_file(host, prefix_length))

    ssh_dir = guest_path(root, "/root/.ssh")
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    write_file(root, "/root/.ssh/authorized_keys", client_public_key, mode=0o600)

    for source, mode in ((host_key, 0o600), (Path(f"{host_key}.pub"), 0o644)):
        target = guest_path(root, f"/etc/ssh/{source.name}")
        shutil.copyfile(source, target)
        os.chmod(target, mode)
        os.chown(target, 0, 0)

"""The state file of a running lab, read by the lab inventory and by `down`."""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class HostState:
    """A started lab host; `pid` is its systemd-nspawn process on this machine."""

    name: str
    role: str
    address: str
    pid: int | None = None
    partition_id: int | None = None
    num_partitions: int | None = None
    data_dir: str | None = None

    def to_dict(self) -> dict:
        """Return the JSON form, leaving out supernode fields that do not apply."""
        return {key: value for key, value in asdict(self).items()
                if value is not None or key == "pid"}


@dataclass
class LabState:
    """Everything needed to reach, check and tear down a lab."""

    subnet: str
    bridge: str
    ssh_key: str
    known_hosts: str
    hosts: list[HostState] = field(default_factory=list)
    dataset: str | None = None
    rootfs: str | None = None

    @property
    def supernodes(self) -> list[HostState]:
        """The supernode hosts, in order."""
        return [host for host in self.hosts if host.role == "supernode"]

    def host(self, name: str) -> HostState:
        """Return the host called `name`, raising KeyError if the lab has none."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def to_dict(self) -> dict:
        """Return the JSON form of the state file."""
        document = {key: value for key, value in asdict(self).items() if key != "hosts"}
        document["hosts"] = [host.to_dict() for host in self.hosts]
        return document

    @classmethod
    def from_dict(cls, document: dict) -> "LabState":
        """Build a state from its JSON form, ignoring fields this version does not know."""
        known_host_fields = HostState.__dataclass_fields__
        hosts = [
            HostState(**{key: value for key, value in host.items() if key in known_host_fields})
            for host in document.get("hosts", [])
        ]
        known_fields = set(cls.__dataclass_fields__) - {"hosts"}
        return cls(hosts=hosts, **{key: value for key, value in document.items() if key in known_fields})


def save_state(state: LabState, path: Path) -> None:
    """Write the state file atomically, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(state.to_dict(), indent=2) + "\n")
    os.replace(partial, path)


def read_state(path: Path) -> LabState | None:
    """Return the state stored at `path`, or None when no lab state exists."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return LabState.from_dict(json.loads(text))

"""Units and wheels of the audit trail: the SuperNode's launcher, the backup timer, local wheels."""

from __future__ import annotations

import platform
import sys

import pytest

from melody_deploy import local_wheels
from melody_deploy.backup import BACKUP_SERVICE, BACKUP_TIMER, backup_context
from melody_deploy.errors import PreflightError
from melody_deploy.plan import HostPlan
from melody_deploy.preflight import HostSpec, validate_inventory
from melody_deploy.units import host_paths, render
from melody_deploy.wheelhouse import Target
from test_units import WHEELHOUSE_ID, exec_start_args, federation, service_lines, superlink_unit, supernode_unit


def test_supernode_runs_audit_launcher():
    unit = supernode_unit(0)
    lines = service_lines(unit)
    args = exec_start_args(unit)

    assert args[:3] == [f"/opt/melody/venvs/flwr-1.42.0-{WHEELHOUSE_ID}/bin/python", "-m", "melody_audit.supernode"]
    assert "--superlink" in args
    assert lines["Type"] == ["notify"]
    assert lines["TimeoutStartSec"] == ["120"]
    assert "MELODY_AUDIT_DIR=/var/lib/melody-supernode/audit" in lines["Environment"]
    # The egress file lies in the state folder, which the sandbox lets the service write.
    assert lines["ReadWritePaths"] == ["/var/lib/melody-supernode"]


def test_superlink_stays_simple_service():
    lines = service_lines(superlink_unit())

    assert lines["Type"] == ["simple"]
    assert "TimeoutStartSec" not in lines


def backup_units(**superlink_data) -> tuple[str, str]:
    link = federation(**superlink_data).superlink
    plan = HostPlan(link, wheelhouse=None, paths=host_paths(link.settings, WHEELHOUSE_ID))
    context = backup_context(plan)
    return render(f"{BACKUP_SERVICE}.j2", context), render(f"{BACKUP_TIMER}.j2", context)


def test_backup_units_from_settings():
    service, timer = backup_units(
        melody_superlink_backup_dir="/srv/backups", melody_superlink_backup_calendar="*-*-* 02:00:00",
        melody_superlink_backup_count=7,
    )

    assert service_lines(service)["ExecStart"] == [
        f"/opt/melody/venvs/flwr-1.42.0-{WHEELHOUSE_ID}/bin/python -m melody_audit.backup "
        f"/var/lib/melody-superlink/state.db /srv/backups --keep 7"
    ]
    assert service_lines(service)["User"] == ["melody"]
    assert "/srv/backups" in service_lines(service)["ReadWritePaths"]
    assert service_lines(timer)["OnCalendar"] == ["*-*-* 02:00:00"]


@pytest.mark.parametrize("calendar", ["daily\nExecStart=/bin/sh", "%h", ""])
def test_backup_calendar_rejects_unit_syntax(calendar):
    with pytest.raises(PreflightError, match="melody_superlink_backup_calendar"):
        validate_inventory([
            HostSpec("link", ("superlink",), {"melody_superlink_backup_calendar": calendar}),
        ])


def this_machine_target(**changes) -> Target:
    name, release = platform.libc_ver()
    glibc = tuple(int(part) for part in release.split(".")[:2])
    values = {"python": tuple(sys.version_info[:2]), "machine": platform.machine(), "glibc": glibc, **changes}
    return Target(**values)


def test_local_wheels_fit_same_python():
    assert local_wheels.target_problem(this_machine_target()) is None


def test_local_wheels_reject_other_python():
    other = (3, sys.version_info[1] + 1)

    problem = local_wheels.target_problem(this_machine_target(python=other))

    assert f"hosts' Python 3.{other[1]}" in problem
    assert f"PYTHON=python3.{other[1]} bash scripts/setup.sh" in problem


def test_local_wheels_reject_older_host_glibc():
    problem = local_wheels.target_problem(this_machine_target(glibc=(2, 17)))

    assert "newer than the hosts' 2.17" in problem


def test_local_wheels_recipe_follows_source():
    recipe = local_wheels.recipe()

    assert recipe[0] == "systemd-python==235"
    assert recipe[1].startswith("melody-audit==0.1.0 source sha256:")

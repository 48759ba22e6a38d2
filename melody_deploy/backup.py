"""The SuperLink's database backup: a oneshot service and the timer that starts it."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import systemd

from .plan import HostPlan
from .service import install_unit
from .units import render

BACKUP_SERVICE = "melody-superlink-backup.service"
BACKUP_TIMER = "melody-superlink-backup.timer"


def backup_context(plan: HostPlan) -> dict:
    settings = plan.settings
    state_dir = settings["melody_superlink_state_dir"]
    return {
        "user": settings["melody_service_user"],
        "python": f"{plan.paths.venv}/bin/python",
        "database": f"{state_dir}/state.db",
        "state_dir": state_dir,
        "backup_dir": settings["melody_superlink_backup_dir"],
        "keep": settings["melody_superlink_backup_count"],
        "calendar": settings["melody_superlink_backup_calendar"],
    }


@deploy("SuperLink database backup")
def install_database_backup(plan: HostPlan) -> None:
    """Install the backup service and timer, and keep the timer enabled and running."""
    context = backup_context(plan)
    service = install_unit(BACKUP_SERVICE, render(f"{BACKUP_SERVICE}.j2", context))
    timer = install_unit(BACKUP_TIMER, render(f"{BACKUP_TIMER}.j2", context))
    systemd.service(
        name=f"{BACKUP_TIMER} is restarted to apply its new schedule",
        service=BACKUP_TIMER,
        running=True,
        restarted=True,
        daemon_reload=True,
        _if=lambda: service.did_change() or timer.did_change(),
    )
    systemd.service(
        name=f"{BACKUP_TIMER} stays enabled and running",
        service=BACKUP_TIMER,
        running=True,
        enabled=True,
    )

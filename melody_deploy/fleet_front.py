"""nginx in front of the SuperLink: the Fleet API only, for SuperNodes.

The SuperLink listens on loopback. nginx terminates TLS on the public port,
publishes an exact allowlist of the Fleet routes (POST only) and re-encrypts
to the SuperLink, checking its certificate.
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, server, systemd

from .plan import HostPlan
from .security_facts import NginxVersion
from .service import superlink_check_script
from .units import REMOTE_TLS, render

NGINX_CONF = "/etc/nginx/conf.d/melody-fleet.conf"

# The Fleet API routes a flwr 1.42 SuperNode calls, all POST under /v1/fleet/
# (read from flwr's Fleet router). Every other request gets 404.
FLEET_ROUTES = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)

# Largest request body nginx passes on; model updates of the training app are
# a few MB, and this leaves room for larger models.
MAX_BODY_SIZE = "1g"
READ_TIMEOUT = "300s"
# Idle connections to the SuperLink that each nginx worker keeps open for reuse.
UPSTREAM_KEEPALIVE = 16
# Fleet requests that nginx passes to the SuperLink at once (the template explains why).
UPSTREAM_MAX_CONNS = 4


def render_nginx_conf(plan: HostPlan) -> str:
    settings = plan.settings
    listen_host = settings["melody_superlink_listen_host"]
    listen = f"[{listen_host}]:{settings['melody_superlink_port']}" if ":" in listen_host \
        else f"{listen_host}:{settings['melody_superlink_port']}"
    return render("melody-fleet-nginx.conf.j2", {
        "listen": listen,
        "upstream": f"127.0.0.1:{settings['melody_superlink_internal_port']}",
        "certificate": REMOTE_TLS.certificate,
        "key": REMOTE_TLS.key,
        "ca_certificate": REMOTE_TLS.ca_certificate,
        "routes": FLEET_ROUTES,
        "max_body_size": MAX_BODY_SIZE,
        "read_timeout": READ_TIMEOUT,
        "upstream_keepalive": UPSTREAM_KEEPALIVE,
        "upstream_max_conns": UPSTREAM_MAX_CONNS,
        "flwr_version": settings["melody_flwr_version"],
    })


@deploy("Fleet API front (nginx)")
def install_fleet_front(plan: HostPlan, changes: list) -> None:
    """Install nginx if missing, publish the Fleet routes, reload nginx after a change.

    `changes` are the operations (such as a new certificate) after which
    nginx must reload even when its configuration is unchanged.
    """
    # nginx comes from the distribution's apt mirror; preflight stopped the
    # deploy already if it is missing and apt-get is not there either.
    if host.get_fact(NginxVersion) is None:
        apt.packages(name="nginx is installed from the distribution", packages=["nginx"], update=True)

    conf = files.put(
        name=f"{NGINX_CONF} publishes the Fleet API only",
        src=StringIO(render_nginx_conf(plan)),
        dest=NGINX_CONF, user="root", group="root", mode="0644",
    )
    changed = lambda: any(op is not None and op.did_change() for op in [conf, *changes])  # noqa: E731
    server.shell(
        name="nginx accepts the new configuration",
        commands=["nginx -t -q"],
        _if=changed,
    )
    systemd.service(name="nginx is reloaded", service="nginx.service", running=True, reloaded=True,
                    _if=changed)
    ensure = systemd.service(name="nginx is enabled and running", service="nginx.service", running=True, enabled=True)
    server.shell(
        name="nginx is healthy after its reload",
        commands=[superlink_check_script("nginx.service", plan.settings["melody_superlink_port"])],
        _if=lambda: changed() or ensure.did_change(),
    )


@deploy("Fleet API front removed")
def remove_fleet_front() -> None:
    """Remove the nginx front, so that a SuperLink without TLS can listen on the public port itself."""
    removed = files.file(name=f"{NGINX_CONF} is absent without TLS", path=NGINX_CONF, present=False)
    server.shell(
        name="nginx no longer serves the Fleet front",
        commands=["systemctl try-reload-or-restart nginx.service"],
        _if=removed.did_change,
    )

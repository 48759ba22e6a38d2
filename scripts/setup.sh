#!/usr/bin/env bash
# Install what a fresh Debian 12 machine needs to run the lab, the deploys and
# the tests: the lab's Debian packages and the project's Python venv (.venv).
# Safe to re-run: apt and pip skip what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc, pkg-config, libsystemd-dev and python3-dev compile systemd-python for the
# hosts' wheelhouse (it has no binary wheels).
apt_packages=(debootstrap systemd-container openssh-client iproute2 python3-venv
    gcc pkg-config libsystemd-dev python3-dev)
missing=()
for package in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# The Compose example's test runs Debian's Docker engine and docker-compose.
bash scripts/install-docker.sh

# Every lab host opens about 8 inotify instances, all counted against root's
# fs.inotify.max_user_instances (128 by default), so a lab of more than about
# 12 hosts needs it raised. Raised only when lower and when this machine lets
# root change it; `melody_lab up` checks it again before it starts hosts.
inotify_wanted=512
inotify_file=/proc/sys/fs/inotify/max_user_instances
if [ -r "$inotify_file" ] && [ "$(cat "$inotify_file")" -lt "$inotify_wanted" ]; then
    if [ "$(id -u)" -eq 0 ] && sysctl -q -w fs.inotify.max_user_instances="$inotify_wanted" 2>/dev/null; then
        echo "setup: raised fs.inotify.max_user_instances to $inotify_wanted for labs of up to 16 SuperNodes"
    else
        echo "setup: WARNING: fs.inotify.max_user_instances is $(cat "$inotify_file") and could not be raised;" \
            "labs of more than about 12 hosts will not start" >&2
    fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[app,test]'
echo "setup: done; tools are in .venv/bin"

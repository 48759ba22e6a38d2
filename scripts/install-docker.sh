#!/usr/bin/env bash
# Install Debian's Docker engine (docker.io, 20.10) and docker-compose (1.29)
# for the Compose example and its test, without starting any service.
#
# The packages' maintainer scripts would start dockerd through init scripts
# on a machine without systemd, with its default bridge and firewall rules.
# That daemon must never run here: the test starts its own dockerd with
# forwarding and firewall management off (melody_deploy/dockerd.py). So a
# policy-rc.d that refuses every start is put in place for the install when
# the machine has none, and removed again afterwards.
# Recommends stay out: cgroupfs-mount's init script would remount cgroups.
set -euo pipefail

packages=(docker.io docker-compose)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# Temporary, from install-docker.sh: start no service during the install.\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

echo "install-docker: installing ${missing[*]} (no service is started)"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"

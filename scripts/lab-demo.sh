#!/usr/bin/env bash
# Run the main job on a fresh Debian 12 machine, as root: install what is
# missing, bring the lab up, deploy, and train across the SuperNodes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m melody_lab.demo "$@"

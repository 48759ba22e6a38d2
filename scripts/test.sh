#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian 12 machine, as root: install what
# is missing (scripts/setup.sh), then the unit tests and the lab integration
# tests, which boot real systemd hosts and deploy to them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -v "$@"

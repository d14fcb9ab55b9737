#!/usr/bin/env bash
# The README's main command: the whole collection on a local AWS endpoint
# (moto server) and local test hosts. Installs what it needs first; a second
# run reuses the virtual environment, the test-host image and the apt cache.
# Options go to scripts/demo.py (--skip-hosts: the AWS steps only).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
fk_setup
exec python scripts/demo.py "$@"

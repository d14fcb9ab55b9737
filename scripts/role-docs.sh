#!/usr/bin/env bash
# Regenerate the variable tables of roles/*/README.md from meta/argument_specs.yml (aar-doc);
# --check lists the READMEs that differ and exits 1 instead. See scripts/role_docs/generate.py.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
fk_setup >/dev/null
python "$FK_ROOT/scripts/role_docs/generate.py" "$@"

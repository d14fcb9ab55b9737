# shellcheck shell=bash
# Shared set-up for scripts/test.sh and scripts/demo.sh. Every step checks
# before it acts, so a second run installs nothing and takes seconds.
set -euo pipefail

FK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FK_VENV=${FK_VENV:-$FK_ROOT/.venv}
FK_BUILD=$FK_ROOT/.build
FK_CACHE=${FK_CACHE:-/var/cache/fleetkeeper}
export FK_ROOT FK_VENV FK_BUILD FK_CACHE

fk_log() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
fk_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Debian packages the controller side needs (openjdk-17-jre-headless: the Java 17
# runtime ansible-rulebook's Drools engine runs in). None of them starts a service on
# this machine; servers used by tests (BIND, unbound, dnsmasq, sshd) run only
# inside test hosts or from unpacked copies under $FK_CACHE.
FK_DEBS=(python3 python3-venv git openssh-client iproute2 debootstrap systemd-container
         bind9-utils bind9-dnsutils nftables dnsperf rsync
         openjdk-17-jre-headless)

fk_apt() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || fk_die "need root to install Debian packages: ${missing[*]}"
  fk_log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The newest Python the current Ansible runs on (3.12+ for ansible-core 2.21),
# else the system's python3 (3.11 on Debian 12, which gets ansible-core 2.19).
fk_python() {
  local candidate
  for candidate in ${FK_PYTHON:-} /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 \
                   /usr/local/bin/python3.12 python3.12 /usr/bin/python3 python3; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      command -v "$candidate"
      return 0
    fi
  done
  fk_die "no Python 3.11 or newer found (set FK_PYTHON)"
}

# fk_venv DIR PYTHON REQUIREMENTS...: create DIR and install the requirements
# unless the stamp says this exact set is already there.
fk_venv() {
  local dir=$1 python=$2; shift 2
  local stamp
  stamp=$( (echo "$python"; "$python" --version; cat "$@" "$FK_ROOT/requirements.txt") | sha256sum | cut -c1-16)
  # One installer at a time: a second caller waits, then finds the stamp.
  # The lock sits beside the venv, so checkouts that share one (FK_VENV) serialise too.
  mkdir -p "$(dirname "$dir")"
  exec {lock}>"$(dirname "$dir")/.$(basename "$dir").lock"
  flock "$lock"
  if [ -f "$dir/.fk-stamp" ] && [ "$(cat "$dir/.fk-stamp")" = "$stamp" ]; then
    flock -u "$lock"
    return 0
  fi
  fk_log "creating $dir with $python ($("$python" --version))"
  rm -rf "$dir"
  "$python" -m venv "$dir"
  local req args=()
  for req in "$@"; do args+=(-r "$req"); done
  # The machine's pip configuration names optional wheel folders that may be
  # absent; drop pip's warnings about those, keep everything else.
  "$dir/bin/pip" install -q "${args[@]}" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2) ||
    fk_die "pip install into $dir failed"
  echo "$stamp" > "$dir/.fk-stamp"
  flock -u "$lock"
}

# Make this checkout importable and loadable as fleetkeeper.aws.
fk_collection_link() {
  local parent=$FK_BUILD/collections/ansible_collections/fleetkeeper
  mkdir -p "$parent"
  if [ "$(readlink "$parent/aws" 2>/dev/null)" != "$FK_ROOT" ]; then
    rm -rf "$parent/aws"
    ln -s "$FK_ROOT" "$parent/aws"
  fi
}

fk_setup() {
  fk_apt "${FK_DEBS[@]}"
  fk_venv "$FK_VENV" "$(fk_python)" "$FK_ROOT/requirements-test.txt"
  fk_collection_link
  export PATH="$FK_VENV/bin:$PATH"
  export ANSIBLE_COLLECTIONS_PATH="$FK_BUILD/collections"
  export ANSIBLE_INVENTORY_UNPARSED_FAILED=True
  export ANSIBLE_HOST_KEY_CHECKING=False
  export ANSIBLE_NOCOLOR=${ANSIBLE_NOCOLOR:-${CI:+1}}
  [ -n "$ANSIBLE_NOCOLOR" ] || unset ANSIBLE_NOCOLOR
  cd "$FK_ROOT"
}

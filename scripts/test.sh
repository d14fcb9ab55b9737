#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs every test stage
# and exits non-zero if any failed. Stages: unit integration sanity lint
# changelog release molecule compat (default: all). Example: scripts/test.sh unit lint
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

ALL_STAGES=(unit integration sanity lint changelog release molecule compat)
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=("${ALL_STAGES[@]}")

fk_setup

stage_unit() { pytest -q -p no:cacheprovider tests/unit; }

stage_integration() { pytest -q -p no:cacheprovider -n 2 tests/integration; }

# ansible-test wants the collection at .../ansible_collections/NAMESPACE/NAME:
# copy the files git would ship (tracked and untracked, not ignored) there.
stage_sanity() {
  local dest=${FK_SANITY_DIR:-$FK_BUILD/sanity}/ansible_collections/fleetkeeper/aws
  rm -rf "$dest" && mkdir -p "$dest"
  git ls-files -z --cached --others --exclude-standard | rsync -a --from0 --files-from=- ./ "$dest/" 2>/dev/null || true
  # ansible-test lists files with git: give the copy a repository of its own,
  # or it finds this checkout's, where .build/ is ignored.
  (cd "$dest" && git init -q && git add -A)
  # Dependencies must sit beside the collection for ansible-test to load their doc fragments and module_utils.
  local dep site
  site=$(python -c 'import ansible_collections.amazon.aws as m, os; print(os.path.dirname(os.path.dirname(list(m.__path__)[0])))')
  for dep in amazon/aws; do
    mkdir -p "$(dirname "$dest")/../$dep"
    rsync -a --delete "$site/$dep/" "$(dirname "$dest")/../$dep/"
  done
  local py pip_version
  py=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  # ansible-test's pip bootstrap comes from a host that is not reachable: use ours.
  pip_version=$(sed -n "s/^ *pip='\([0-9.]*\)',.*/\1/p" \
    "$(python -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')/_internal/python_requirements.py")
  mkdir -p ~/.ansible/test/cache
  cp scripts/ansible-test-get-pip.py ~/.ansible/test/cache/get_pip_${pip_version//./_}.py
  (cd "$dest" && ansible-test sanity --venv --python "$py" --color no ${FK_SANITY_ARGS:-})
}

# The command a new contributor runs in a fresh clone: ansible-lint installs this checkout as
# fleetkeeper.aws into .ansible/ (ignored by git and by galaxy.yml's build_ignore) and finds
# amazon.aws installed. Its syntax checks run without an inventory: do not fail on that.
stage_lint() { env -u ANSIBLE_COLLECTIONS_PATH ANSIBLE_INVENTORY_UNPARSED_FAILED=False ansible-lint --profile production -q; }

stage_changelog() { antsibull-changelog lint; }

# What a release runs, on a fresh copy of the checkout: ansible-lint with nothing set up, the Galaxy
# build and galaxy-importer (whose own ansible-lint has 180 s, so this stage runs alone, one test at a
# time), antsibull-changelog release, ansible-builder create on both environment definitions, and
# Molecule's scenario discovery (docs/development.md, "Releasing").
stage_release() { pytest -q -p no:cacheprovider tests/release; }

stage_molecule() {
  local scenario found=0 broken=()
  # Remove what a killed run left behind, and build the test-host image once
  # up front rather than inside the first scenario's create step.
  python -m lab.hosts cleanup
  python -m lab.hosts build-image --release all
  for scenario in extensions/molecule/*/molecule.yml; do
    [ -e "$scenario" ] || continue
    found=1
    scenario=$(basename "$(dirname "$scenario")")
    fk_log "molecule scenario $scenario"
    (cd extensions && molecule test -s "$scenario") || broken+=("$scenario")
  done
  [ $found -eq 1 ] || fk_die "no molecule scenarios found under extensions/molecule"
  [ ${#broken[@]} -eq 0 ] || fk_die "molecule scenarios failed: ${broken[*]}"
}

# The oldest release line meta/runtime.yml declares (ansible-core 2.18, amazon.aws 9) runs what
# differs between cores: the tests marked `compat` (module argument handling, inventory options and
# output, role validation, the EDA source; pytest.ini). Everything else is Python of our own that the
# unit and integration stages already ran.
stage_compat() {
  local venv=$FK_ROOT/.venv-compat py
  py=$(command -v /root/.pyenv/versions/3.11*/bin/python3.11 /usr/bin/python3.11 python3.11 2>/dev/null | head -1)
  [ -n "$py" ] || fk_die "compat stage needs python3.11"
  fk_venv "$venv" "$py" "$FK_ROOT/requirements-compat.txt"
  PATH="$venv/bin:$PATH" "$venv/bin/pytest" -q -p no:cacheprovider -n 2 -m compat tests/unit tests/integration
}

# Without arguments the stages run in two lanes side by side, each stage's output printed whole
# when it ends: integration and compat mostly wait (on moto, ansible-rulebook, test hosts booting),
# while sanity, lint and release mostly compute, so together they take about the longer lane.
LANES=("unit integration compat" "sanity lint changelog release molecule")

for stage in "${STAGES[@]}"; do
  declare -F "stage_$stage" >/dev/null || fk_die "unknown stage $stage (stages: ${ALL_STAGES[*]})"
  [[ " ${LANES[*]} " == *" $stage "* ]] || fk_die "stage $stage is in no lane (LANES in scripts/test.sh)"
done

RESULTS=$FK_BUILD/test-results
mkdir -p "$RESULTS"
rm -f "$RESULTS"/*

# run_stage STAGE [LOG]: run one stage, to LOG if given, and record whether it passed.
run_stage() {
  local stage=$1 log=${2:-} start=$SECONDS status=passed
  # A stage runs as a job of its own, so `set -e` holds inside it (bash ignores it in a
  # function called as the condition of `||` or `if`): any failed command fails the stage.
  if [ -n "$log" ]; then
    ( "stage_$stage" ) >"$log" 2>&1 &
    wait $! || status=failed
    local took=$((SECONDS - start))
    # One lane prints at a time, so a stage's output is never mixed with the other lane's
    # (the stage's time is taken before waiting for the other lane to finish printing).
    {
      flock 9
      fk_log "stage: $stage"
      cat "$log"
      echo "stage $stage took ${took}s"
    } 9>"$RESULTS/.print.lock"
  else
    fk_log "stage: $stage"
    ( "stage_$stage" ) &
    wait $! || status=failed
    echo "stage $stage took $((SECONDS - start))s"
  fi
  echo "$stage" >"$RESULTS/$status.$stage"
}

run_lane() {
  local stage
  for stage in "$@"; do
    echo "stage $stage started (lane: $*)" >&2
    run_stage "$stage" "$RESULTS/$stage.log"
  done
}

# kill_tree PID: end PID and everything it started (a lane's stages, their pytest workers, molecule).
kill_tree() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$child"; done
  kill -TERM "$1" 2>/dev/null || true
}

if [ $# -eq 0 ]; then
  lanes=()
  # A lane that outlives this script would run on unobserved: end both when it is interrupted.
  trap 'for pid in "${lanes[@]}"; do kill_tree "$pid"; done; wait; exit 130' INT TERM
  for lane in "${LANES[@]}"; do
    # shellcheck disable=SC2086 # a lane is a list of stage names
    run_lane $lane &
    lanes+=($!)
  done
  wait "${lanes[@]}" || true
  trap - INT TERM
else
  for stage in "${STAGES[@]}"; do run_stage "$stage"; done
fi

passed=() failed=()
for stage in "${STAGES[@]}"; do
  if [ -e "$RESULTS/passed.$stage" ]; then passed+=("$stage"); else failed+=("$stage"); fi
done

fk_log "summary"
[ ${#passed[@]} -eq 0 ] || echo "passed: ${passed[*]}"
[ ${#failed[@]} -eq 0 ] || echo "FAILED: ${failed[*]}"
echo "stages: ${#passed[@]} passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]

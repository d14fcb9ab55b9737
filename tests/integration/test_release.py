# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a release runs on a plain checkout: ansible-lint in a fresh clone, the Galaxy build and import."""

from __future__ import annotations

import os
import subprocess
import tarfile

import pytest

from tests.support.ansiblerun import BIN_DIR, REPO_ROOT, ansible_env

pytestmark = pytest.mark.slow


def checkout_files():
    """The files a fresh clone of this working tree has: tracked and untracked, not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, capture_output=True, check=True)
    return sorted(path for path in listed.stdout.decode().split("\0")
                  if path and os.path.lexists(os.path.join(REPO_ROOT, path)))


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """A copy of the checkout as `git clone` gives it, in a repository of its own."""
    clone = tmp_path_factory.mktemp("clone") / "aws"
    files = checkout_files()
    subprocess.run(["rsync", "-a", "--from0", "--files-from=-", REPO_ROOT + "/", str(clone) + "/"],
                   input="\0".join(files).encode(), check=True)
    for command in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(command, cwd=clone, check=True)
    return clone, files


def plain_env():
    """A new contributor's shell: the test virtualenv on PATH, no collection path or Ansible settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env["PATH"] = BIN_DIR + os.pathsep + env.get("PATH", "")
    env["NO_COLOR"] = "1"
    return env


def build(source, output):
    subprocess.run([os.path.join(BIN_DIR, "ansible-galaxy"), "collection", "build", str(source),
                    "--output-path", str(output)], capture_output=True, text=True, check=True, env=ansible_env())
    (tarball,) = output.glob("fleetkeeper-aws-*.tar.gz")
    return tarball


def test_lint_passes_in_a_fresh_clone_and_the_next_build_ships_only_checkout_files(fresh_clone, tmp_path):
    clone, files = fresh_clone
    lint = subprocess.run([os.path.join(BIN_DIR, "ansible-lint"), "--profile", "production", "--nocolor"],
                          cwd=clone, capture_output=True, text=True, env=plain_env(), timeout=900)
    assert lint.returncode == 0, lint.stdout[-6000:] + lint.stderr[-6000:]
    assert "Profile 'production' was required, and it passed" in lint.stdout + lint.stderr
    # ansible-lint found the collection by installing this tree: its working directory is left behind ...
    assert (clone / ".ansible" / "collections" / "ansible_collections" / "fleetkeeper" / "aws").is_dir()
    left = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=clone,
                          capture_output=True, text=True, check=True)
    assert left.stdout == "", "lint left files git would pick up:\n" + left.stdout
    # ... and caches of the other tools too; the next build ships none of them.
    for cache in (".cache/ansible-compat/x", ".pytest_cache/v/x", "plugins/modules/__pycache__/x.pyc",
                  "tests/output/x", "..venv.lock", ".venv/bin/x", ".venv-compat/bin/x", ".build/x",
                  "extensions/molecule/testhosts/.molecule/x", ".hypothesis/x", "benchmarks/results/raw/x"):
        (clone / cache).parent.mkdir(parents=True, exist_ok=True)
        (clone / cache).write_text("cache\n")
    tarball = build(clone, tmp_path)
    with tarfile.open(tarball) as archive:
        shipped = {member.name for member in archive.getmembers() if not member.isdir()}
    extra = shipped - set(files) - {"MANIFEST.json", "FILES.json"}
    assert not extra, f"the tarball ships files that are not in the checkout: {sorted(extra)[:20]}"
    assert "galaxy.yml" not in shipped and "plugins/inventory/fleet.py" in shipped
    assert os.path.getsize(tarball) < 1_500_000, os.path.getsize(tarball)

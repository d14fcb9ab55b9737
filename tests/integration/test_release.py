# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a release runs on a plain checkout: ansible-lint in a fresh clone, the Galaxy build and import."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tarfile

import pytest
import yaml

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


def test_galaxy_importer_accepts_the_tarball_without_a_warning(fresh_clone, tmp_path):
    """Galaxy's own import: ansible-doc on every plugin, ansible-lint on the content, the metadata checks."""
    clone, _ = fresh_clone
    tarball = build(clone, tmp_path)
    run = subprocess.run([os.path.join(BIN_DIR, "python"), "-m", "galaxy_importer.main", str(tarball)],
                         cwd=tmp_path, capture_output=True, text=True, env=plain_env(), timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "Importer processing completed successfully" in output, output[-6000:]
    for kind, name in (("filter", "vpc_dns_resolver"), ("filter", "dns_cache_nsswitch"), ("inventory", "fleet"),
                       ("module", "s3_authorized_keys"), ("role", "dns_cache"), ("playbook", "site.yml")):
        assert f"Loading {kind} {name}" in output, (kind, name)
    assert "Loading filter dns_cache\n" not in output
    noise = [line for line in output.splitlines() if re.match(r"^\s*(WARNING|ERROR|CRITICAL)\b", line)]
    assert not noise, "\n".join(noise)


def test_first_release_changelog(fresh_clone, tmp_path):
    """antsibull-changelog release for galaxy.yml's version, in a copy: what the release commit would contain."""
    clone, _ = fresh_clone
    copy = tmp_path / "ansible_collections" / "fleetkeeper" / "aws"
    shutil.copytree(clone, copy, ignore=shutil.ignore_patterns(".ansible", ".git"))
    with open(copy / "galaxy.yml", encoding="utf-8") as handle:
        version = yaml.safe_load(handle)["version"]
    release = subprocess.run([os.path.join(BIN_DIR, "antsibull-changelog"), "release", "--version", version,
                              "--date", "2026-12-02"], cwd=copy, capture_output=True, text=True,
                             env=ansible_env({"ANSIBLE_COLLECTIONS_PATH": str(tmp_path)}), timeout=600)
    assert release.returncode == 0, release.stdout + release.stderr
    assert "release_summary" not in release.stderr, release.stderr
    text = (copy / "CHANGELOG.rst").read_text(encoding="utf-8")
    sections = re.findall(r"^(.+)\n-+\n", text, re.M)
    assert sections[0] == "Release Summary", sections
    assert "Bugfixes" not in sections and "Security Fixes" not in sections, sections
    assert not {"Breaking Changes / Porting Guide", "Deprecated Features", "Removed Features (previously deprecated)"} & set(sections)
    new, lines, current = {}, text.splitlines(), None
    for number, line in enumerate(lines):
        if number + 1 < len(lines) and lines[number + 1].startswith("---") and line.strip():
            current = line
        match = re.match(r"^- fleetkeeper\.aws\.([a-z_0-9]+) - ", line)
        if match and current:
            new.setdefault(current, set()).add(match.group(1))
    expect = {
        "New Modules": {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO_ROOT, "plugins/modules/*.py"))},
        "New Plugins": {os.path.basename(p)[:-3] for d in ("filter", "inventory")
                        for p in glob.glob(os.path.join(REPO_ROOT, "plugins", d, "*.py"))},
        "New Roles": {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(REPO_ROOT, "roles/*/meta"))},
        "New Playbooks": {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(REPO_ROOT, "playbooks/*.yml"))},
    }
    assert new == expect
    assert not list((copy / "changelogs" / "fragments").glob("*.yml")), "the release consumes every fragment"

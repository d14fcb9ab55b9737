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

from lab.ansiblerun import BIN_DIR, REPO_ROOT, ansible_env

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
                          cwd=clone, capture_output=True, text=True, env=plain_env(), timeout=900, check=False)
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
                  "extensions/molecule/default/.molecule/x", ".hypothesis/x", "benchmarks/results/raw/x"):
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
    clone = fresh_clone[0]
    tarball = build(clone, tmp_path)
    run = subprocess.run([os.path.join(BIN_DIR, "python"), "-m", "galaxy_importer.main", str(tarball)],
                         cwd=tmp_path, capture_output=True, text=True, env=plain_env(), timeout=900, check=False)
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
    clone = fresh_clone[0]
    copy = tmp_path / "ansible_collections" / "fleetkeeper" / "aws"
    shutil.copytree(clone, copy, ignore=shutil.ignore_patterns(".ansible", ".git"))
    with open(copy / "galaxy.yml", encoding="utf-8") as handle:
        version = yaml.safe_load(handle)["version"]
    release = subprocess.run([os.path.join(BIN_DIR, "antsibull-changelog"), "release", "--version", version,
                              "--date", "2026-12-02"], cwd=copy, capture_output=True, text=True,
                             env=ansible_env({"ANSIBLE_COLLECTIONS_PATH": str(tmp_path)}), timeout=600, check=False)
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


@pytest.mark.parametrize("definition", ["execution-environment.yml", "decision-environment.yml"])
def test_environment_definitions_build_from_the_checkout(fresh_clone, tmp_path, definition):
    """`ansible-builder create` as the definitions' own comments say to run it, on a fresh clone."""
    clone = fresh_clone[0]
    env = plain_env()
    subprocess.run([os.path.join(BIN_DIR, "ansible-galaxy"), "collection", "build", "--force", "--output-path",
                    ".build/ee"], cwd=clone, capture_output=True, text=True, check=True, env=env)
    with open(clone / "galaxy.yml", encoding="utf-8") as handle:
        version = yaml.safe_load(handle)["version"]
    context = tmp_path / "context"
    create = subprocess.run([os.path.join(BIN_DIR, "ansible-builder"), "create", "-f", definition, "--context",
                             str(context)], cwd=clone, capture_output=True, text=True, env=env, timeout=300, check=False)
    output = create.stdout + create.stderr
    assert create.returncode == 0, output
    assert "WARNING" not in output.upper().replace("PIP_BREAK", ""), output
    (containerfile,) = [path for path in (context / "Containerfile", context / "Dockerfile") if path.is_file()]
    text = containerfile.read_text(encoding="utf-8")
    with open(clone / definition, encoding="utf-8") as handle:
        spec = yaml.safe_load(handle)
    image = spec["images"]["base_image"]["name"]
    # A supported base image: UBI 9 (Red Hat supports it until 2032); Fedora releases live 13 months.
    assert image.startswith("registry.access.redhat.com/ubi9/"), image
    assert f"EE_BASE_IMAGE=\"{image}\"" in text or f"EE_BASE_IMAGE={image}" in text, text[:800]
    # The collection is this checkout's tarball, copied into the context; nothing asks Galaxy for it by name.
    tarball = context / "_build" / "collections" / f"fleetkeeper-aws-{version}.tar.gz"
    with tarfile.open(tarball) as archive:
        assert "plugins/inventory/fleet.py" in archive.getnames()
        assert "extensions/eda/plugins/event_source/asg_lifecycle.py" in archive.getnames()
    with open(context / "_build" / "requirements.yml", encoding="utf-8") as handle:
        collections = yaml.safe_load(handle)["collections"]
    names = {entry["name"]: entry for entry in collections}
    assert names[f"collections/fleetkeeper-aws-{version}.tar.gz"].get("type") == "file", collections
    assert "fleetkeeper.aws" not in names and "amazon.aws" in names, collections
    assert "ansible-galaxy collection install" in text and "-r requirements.yml" in text
    if definition == "decision-environment.yml":
        assert "ansible-rulebook" in (context / "_build" / "requirements.txt").read_text(encoding="utf-8")
        assert "java-17-openjdk-headless" in (context / "_build" / "bindep.txt").read_text(encoding="utf-8")
        assert "JAVA_HOME=" in text


def test_collection_brings_its_python_requirements_into_an_environment(fresh_clone, tmp_path):
    """ansible-builder reads the installed collection's requirements.txt: boto3 reaches both environments."""
    clone = fresh_clone[0]
    tarball = build(clone, tmp_path)
    subprocess.run([os.path.join(BIN_DIR, "ansible-galaxy"), "collection", "install", "--no-deps", "--force", "-p",
                    str(tmp_path / "collections"), str(tarball)], capture_output=True, check=True, env=plain_env())
    introspect = subprocess.run([os.path.join(BIN_DIR, "ansible-builder"), "introspect", "--sanitize",
                                 str(tmp_path / "collections")], capture_output=True, text=True, check=True,
                                env=plain_env())
    data = yaml.safe_load(introspect.stdout.split("\n", 1)[1])
    assert "boto3>=1.34.0  # from collection fleetkeeper.aws" in data["python"], data
    assert "openssh-clients [platform:rpm]  # from collection fleetkeeper.aws" in data["system"], data


def test_molecule_finds_its_default_scenario_and_logs_no_critical_line():
    """Molecule looks for the `default` scenario before every run and logs CRITICAL when there is none."""
    run = subprocess.run([os.path.join(BIN_DIR, "molecule"), "syntax", "-s", "instance_profile"],
                         cwd=os.path.join(REPO_ROOT, "extensions"), capture_output=True, text=True,
                         env=ansible_env({"NO_COLOR": "1"}), timeout=600, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "CRITICAL" not in output and "glob failed" not in output, output[-4000:]

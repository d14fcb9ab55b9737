# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Release metadata that must agree with itself: versions, platforms, declared collections, changelog fragments."""

from __future__ import annotations

import glob
import os
import re

import yaml
from packaging.version import Version

from lab.ansiblerun import REPO_ROOT

_NAME = r"([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)\.[a-z][a-z0-9_]*"
# Where content names a collection's plugin or role: a task's action, module_defaults' group/, a filter or test,
# a lookup, a role, a source (rulebooks) or a callback.
FQCN = re.compile(r"^\s*(?:- )?(?:group/)?" + _NAME + r":"
                  r"|(?:\||\bis(?: not)?)\s*" + _NAME + r"\b"
                  r"|\b(?:lookup|query|q)\(\s*['\"]" + _NAME + r"\b"
                  r"|\b(?:role|name|include_role|import_role|stdout_callback|callbacks_enabled):\s*['\"]?" + _NAME
                  + r"\s*['\"]?\s*$", re.M)
# Changelog sections that only make sense after a release: nothing released can have been fixed or removed.
AFTER_RELEASE = {"bugfixes", "security_fixes", "breaking_changes", "deprecated_features", "removed_features"}


def load(path):
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def collection_version():
    return Version(load("galaxy.yml")["version"])


def content_files():
    patterns = ("plugins/**/*.py", "plugins/**/*.yml", "roles/*/meta/*.yml", "extensions/eda/**/*.py",
                "extensions/eda/**/*.yml", "meta/runtime.yml")
    for pattern in patterns:
        yield from glob.glob(os.path.join(REPO_ROOT, pattern), recursive=True)


def test_version_added_is_never_later_than_the_collection():
    version = collection_version()
    found = []
    for path in content_files():
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                match = re.search(r"version_added:\s*['\"]?([0-9][0-9.]*)", line)
                if match:
                    found.append((os.path.relpath(path, REPO_ROOT), number, Version(match.group(1))))
    assert len(found) >= 12, found  # every module, plugin and role says when it came
    late = [entry for entry in found if entry[2] > version]
    assert not late, f"version_added later than galaxy.yml's {version}: {late}"


def test_every_role_says_when_it_came():
    for spec in glob.glob(os.path.join(REPO_ROOT, "roles", "*", "meta", "argument_specs.yml")):
        with open(spec, encoding="utf-8") as handle:
            main = yaml.safe_load(handle)["argument_specs"]["main"]
        assert Version(str(main.get("version_added"))) <= collection_version(), spec


def booted_platforms():
    """The platforms README.md's managed-host table calls booted, as {name: {codename, ...}}."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as handle:
        rows = [line.split("|")[1:-1] for line in handle if line.startswith("|")]
    booted = {}
    for cells in rows:
        if len(cells) >= 2 and "**booted**" in cells[1]:
            for name, codename in re.findall(r"(\w+) \d+ \((\w+)\)", cells[0]):
                booted.setdefault(name, set()).add(codename)
    return booted


def test_roles_list_exactly_the_booted_platforms():
    booted = booted_platforms()
    assert booted == {"Debian": {"bookworm", "trixie"}}, booted
    roles = glob.glob(os.path.join(REPO_ROOT, "roles", "*", "meta", "main.yml"))
    assert len(roles) >= 3
    for path in roles:
        with open(path, encoding="utf-8") as handle:
            platforms = yaml.safe_load(handle)["galaxy_info"]["platforms"]
        listed = {entry["name"]: set(entry["versions"]) for entry in platforms}
        assert listed == booted, (path, listed)


def used_collections(paths):
    used = set()
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            text = "\n".join(line.split(" #")[0] for line in handle if not line.lstrip().startswith("#"))
        for match in FQCN.finditer(text):
            groups = [group for group in match.groups() if group]
            used.add(f"{groups[0]}.{groups[1]}")
    return used


def test_molecule_scenarios_declare_the_collections_they_use():
    scenarios = glob.glob(os.path.join(REPO_ROOT, "extensions", "molecule", "**", "*.yml"), recursive=True)
    declared = {entry["name"] for entry in load("extensions/molecule/requirements.yml")["collections"]}
    used = used_collections(path for path in scenarios if not path.endswith("requirements.yml"))
    assert "community.crypto" in used and "amazon.aws" in used, used  # the check sees what it must see
    # ansible.builtin ships with ansible-core, fleetkeeper.aws is this checkout.
    undeclared = used - declared - {"ansible.builtin", "fleetkeeper.aws"}
    assert not undeclared, f"Molecule scenarios use collections extensions/molecule/requirements.yml lacks: {undeclared}"


def test_shipped_content_needs_only_galaxy_dependencies():
    paths = [path for pattern in ("playbooks/*.yml", "roles/**/*.yml", "extensions/eda/rulebooks/*.yml")
             for path in glob.glob(os.path.join(REPO_ROOT, pattern), recursive=True)]
    declared = set(load("galaxy.yml")["dependencies"])
    used = used_collections(paths)
    assert "amazon.aws" in used, used
    undeclared = used - declared - {"ansible.builtin", "fleetkeeper.aws"}
    assert not undeclared, f"playbooks and roles use collections galaxy.yml does not depend on: {undeclared}"


def test_no_fix_sections_before_the_first_release():
    releases = (load("changelogs/changelog.yaml") or {}).get("releases") or {}
    if releases:
        return
    offending = {}
    for path in glob.glob(os.path.join(REPO_ROOT, "changelogs", "fragments", "*.y*ml")):
        with open(path, encoding="utf-8") as handle:
            sections = set(yaml.safe_load(handle) or {})
        if sections & AFTER_RELEASE:
            offending[os.path.basename(path)] = sorted(sections & AFTER_RELEASE)
    assert not offending, ("nothing is released yet, so nothing was fixed or removed: use minor_changes or "
                           f"trivial (docs/development.md, 'Releasing'): {offending}")
    summaries = [path for path in glob.glob(os.path.join(REPO_ROOT, "changelogs", "fragments", "*.y*ml"))
                 if "release_summary" in (yaml.safe_load(open(path, encoding="utf-8")) or {})]
    assert len(summaries) == 1, summaries


def test_test_files_have_unique_basenames():
    """The compat stage collects tests/unit and tests/integration in one pytest run (rootdir-relative
    imports without __init__.py): two test files with one basename stop it with 'import file mismatch'."""
    seen = {}
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "tests", "*", "test_*.py"))):
        seen.setdefault(os.path.basename(path), []).append(os.path.relpath(path, REPO_ROOT))
    twins = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not twins, f"rename one of each: {twins}"

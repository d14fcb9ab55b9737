# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection as users get it: built, installed, documented."""

from __future__ import annotations

import pytest

import glob
import importlib
import os
import subprocess
import tarfile

import yaml

from lab.ansiblerun import BIN_DIR, REPO_ROOT, ansible_env

PLUGIN_DIRS = {"modules": "module", "inventory": "inventory", "filter": "filter"}


def filter_names(path):
    """The filters a filter plugin file provides (one file may hold several, each documented in NAME.yml)."""
    module = importlib.import_module(
        "ansible_collections.fleetkeeper.aws.plugins.filter." + os.path.splitext(os.path.basename(path))[0])
    return sorted(module.FilterModule().filters())


def shipped_plugins():
    found = []
    for directory, kind in PLUGIN_DIRS.items():
        for path in glob.glob(os.path.join(REPO_ROOT, "plugins", directory, "*.py")):
            name = os.path.splitext(os.path.basename(path))[0]
            if name.startswith("_"):
                continue
            found.extend((kind, n) for n in (filter_names(path) if kind == "filter" else [name]))
    return sorted(found)


def test_every_filter_has_its_documentation_file():
    for path in glob.glob(os.path.join(REPO_ROOT, "plugins", "filter", "*.py")):
        for name in filter_names(path):
            assert os.path.isfile(os.path.join(REPO_ROOT, "plugins", "filter", f"{name}.yml")), name


def test_every_filter_file_is_one_filter_of_its_name():
    """Galaxy lists each file in plugins/filter as a filter and documents it by the file's name."""
    paths = glob.glob(os.path.join(REPO_ROOT, "plugins", "filter", "*.py"))
    assert paths
    for path in paths:
        assert filter_names(path) == [os.path.splitext(os.path.basename(path))[0]], path


@pytest.mark.compat
def test_build_install_and_document(tmp_path):
    build = subprocess.run(
        [os.path.join(BIN_DIR, "ansible-galaxy"), "collection", "build", REPO_ROOT, "--output-path", str(tmp_path)],
        capture_output=True, text=True, check=True, env=ansible_env(),
    )
    tarballs = glob.glob(str(tmp_path / "fleetkeeper-aws-*.tar.gz"))
    assert len(tarballs) == 1, build.stdout
    # Every file header points at COPYING: the tarball carries the full GPLv3 text.
    with tarfile.open(tarballs[0]) as tarball:
        copying = tarball.extractfile("COPYING")
        assert copying is not None, "COPYING is missing from the built collection"
        text = copying.read().decode("utf-8")
    with open(os.path.join(REPO_ROOT, "COPYING"), encoding="utf-8") as handle:
        assert text == handle.read()
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE") and "Version 3, 29 June 2007" in text
    assert "How to Apply These Terms to Your New Programs" in text  # the whole text, not a stub
    install_dir = tmp_path / "collections"
    subprocess.run(
        [os.path.join(BIN_DIR, "ansible-galaxy"), "collection", "install", "--no-deps", "--force", "-p", str(install_dir), tarballs[0]],
        capture_output=True, text=True, check=True, env=ansible_env(),
    )
    installed = install_dir / "ansible_collections" / "fleetkeeper" / "aws"
    assert (installed / "MANIFEST.json").is_file()
    for unwanted in (".venv", ".venv-compat", ".build", "tests/output"):
        assert not (installed / unwanted).exists(), unwanted
    env = ansible_env({"ANSIBLE_COLLECTIONS_PATH": str(install_dir)})
    for kind, name in shipped_plugins():
        listed = subprocess.run([os.path.join(BIN_DIR, "ansible-doc"), "-t", kind, "-l", "fleetkeeper.aws"],
                                capture_output=True, text=True, check=True, env=env)
        assert f"fleetkeeper.aws.{name}" in listed.stdout, (kind, name, listed.stdout, listed.stderr)
        page = subprocess.run([os.path.join(BIN_DIR, "ansible-doc"), "-t", kind, f"fleetkeeper.aws.{name}"],
                              capture_output=True, text=True, check=False, env=env)
        assert page.returncode == 0 and "EXAMPLES" in page.stdout, page.stderr


def test_action_group_names_existing_modules():
    with open(os.path.join(REPO_ROOT, "meta", "runtime.yml"), encoding="utf-8") as handle:
        runtime = yaml.safe_load(handle)
    modules = {name for kind, name in shipped_plugins() if kind == "module"}
    group = [entry for entry in runtime["action_groups"]["aws"] if isinstance(entry, str)]
    assert set(group) <= modules, f"action group names missing modules: {set(group) - modules}"

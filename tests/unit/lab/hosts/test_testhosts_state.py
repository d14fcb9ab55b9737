# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Stale-run detection, process identities and the apt proxy's cache rules."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lab.hosts import aptproxy
from lab.hosts import state as runstate

LIVE = {"pid": 100, "start": 1}
GONE = {"pid": 200, "start": 2}


def fake_alive(identity):
    return identity is not None and identity.get("pid") == 100


def ready(**extra):
    return {"phase": "ready", "daemon": LIVE, **extra}


@pytest.mark.parametrize("st, stale", [
    ({"phase": "creating", "creator": LIVE}, False),
    ({"phase": "creating", "creator": GONE}, True),
    ({"phase": "creating"}, True),
    ({"phase": "destroying", "destroyer": LIVE}, False),
    ({"phase": "destroying", "destroyer": GONE}, True),
    (ready(), False),
    (ready(daemon=GONE), True),
    (ready(owner={**LIVE, "command": "test"}), False),
    (ready(owner={**GONE, "command": "test"}), True),
    # `molecule create` exits at once; its run lives until `molecule destroy`.
    (ready(owner={**GONE, "command": "create"}), False),
    (ready(owner={**GONE, "command": "converge"}), False),
])
def test_staleness(st, stale):
    reason = runstate.staleness(st, fake_alive)
    assert (reason is not None) == stale
    if stale:
        assert reason  # says why


def test_process_identity_survives_only_for_the_same_process():
    me = runstate.process_identity(os.getpid())
    assert runstate.alive(me)
    assert not runstate.alive({**me, "start": me["start"] + 1})  # a reused PID is another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # pylint: disable=consider-using-with
    identity = runstate.process_identity(child.pid)
    child.wait()
    assert not runstate.alive(identity)
    assert not runstate.alive(None)


@pytest.mark.parametrize("argv, command", [
    (["/work/main/.venv/bin/python3.12", "/work/main/.venv/bin/molecule", "test", "-s", "testhosts"], "test"),
    (["molecule", "--debug", "create", "-s", "x"], "create"),
    (["python", "-m", "molecule", "converge"], "converge"),
    (["molecule", "-c", "base.yml", "verify"], "verify"),
    (["ansible-playbook", "create.yml"], None),
    (["python", "tests/molecule_helper.py", "test"], None),
])
def test_molecule_command(argv, command):
    assert runstate.molecule_command(argv) == command


def test_find_molecule_owner_is_none_outside_molecule():
    assert runstate.find_molecule_owner() is None


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "state.json"
    runstate.save(str(path), {"run_id": "abcdef", "namespaces": ["fk-abcdef-n0"]})
    assert runstate.load(str(path)) == {"run_id": "abcdef", "namespaces": ["fk-abcdef-n0"]}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


@pytest.mark.parametrize("path, immutable", [
    ("/debian/pool/main/h/hello/hello_2.10-3_amd64.deb", True),
    ("/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/0123abcd", True),
    ("/debian/dists/bookworm/InRelease", False),
    ("/debian/dists/bookworm/main/binary-amd64/Packages.xz", False),
])
def test_apt_proxy_caches_forever_only_what_never_changes(path, immutable):
    assert aptproxy.is_immutable(path) == immutable


@pytest.mark.parametrize("host, path, expected", [
    ("deb.debian.org", "/debian/pool/main/h/hello.deb", "/c/deb.debian.org/debian/pool/main/h/hello.deb"),
    ("DEB.debian.org", "/debian/dists/bookworm/InRelease", "/c/deb.debian.org/debian/dists/bookworm/InRelease"),
    ("deb.debian.org", "/debian/../../etc/passwd", "/c/deb.debian.org/etc/passwd"),
    ("deb.debian.org", "/debian/%2e%2e/x", "/c/deb.debian.org/x"),
    ("deb.debian.org", "/debian/dists/", None),
    ("deb.debian.org", "/debian/.fk-meta/x.json", None),
    ("../x", "/debian/a", None),
])
def test_apt_proxy_cache_paths_stay_inside_the_cache(host, path, expected):
    assert aptproxy.cache_path("/c", host, path) == expected

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The README's demo (scripts/demo.py) prints no warning and no deprecation.

It runs the collection's main playbooks (the fleet inventory,
fleetkeeper.aws.instance_profiles, fleetkeeper.aws.site with bastion_keys and
dns_cache on test hosts, dns_cache_stats) as a user would, with deprecation
warnings on. Every `[WARNING]` and `[DEPRECATION WARNING]` fails the test,
unless it matches NOT_OURS: warnings that provably come from outside this
collection's content, each with the reason it is not ours.

Needs root and the test-host harness (docs/testhosts.md); a few minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from lab.ansiblerun import REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"),
                       reason="needs root, systemd-nspawn and debootstrap"),
]

# (regex, why it is not this collection's content) -- only what is proven external.
NOT_OURS: list = [
    (r"\[WARNING\]: Deprecation warnings can be disabled by setting",
     "ansible-core's note under every deprecation; the deprecation itself is judged on its own"),
    (r"iam_role\.assume_role_policy_document_raw will no longer be returned",
     "amazon.aws's iam_role calls module.deprecate() on every run, whatever its caller passes (amazon.aws 11)"),
]


def warnings_in(output: str) -> list:
    """Each warning with the lines that continue it (up to the next blank line)."""
    found = []
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if "[WARNING]" in line or "[DEPRECATION WARNING]" in line:
            block = [line]
            for follow in lines[index + 1:index + 8]:
                if not follow.strip() or follow.lstrip().startswith(("TASK", "PLAY", "ok:", "changed:", "$ ", "-->")):
                    break
                block.append(follow)
            found.append("\n".join(block))
    return [w for w in found if not any(re.search(pattern, w) for pattern, _why in NOT_OURS)]


def test_warnings_in_recognises_both_kinds():
    text = ("TASK [x]\n[WARNING]: Found both group and host with same name: private\n\n"
            "[DEPRECATION WARNING]: INJECT_FACTS_AS_VARS default to `True` is deprecated.\n"
            "Origin: roles/bastion_keys/tasks/main.yml:3:5\n\nok: [h]\n")
    found = warnings_in(text)
    assert len(found) == 2 and "Origin: roles/bastion_keys" in found[1]
    assert warnings_in("ok: [h]\nchanged: [h]\n") == []


def test_the_demo_prints_no_warning_and_no_deprecation(tmp_path):
    env = dict(os.environ, ANSIBLE_DEPRECATION_WARNINGS="True", ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               FK_DEMO_WORK=str(tmp_path / "demo"))
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "demo.py")],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=1800, check=False)
    output = result.stdout + "\n" + result.stderr
    assert result.returncode == 0, output[-6000:]
    found = warnings_in(output)
    assert not found, "the demo printed warnings:\n\n" + "\n\n".join(found)

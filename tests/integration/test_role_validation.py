# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Each role stops at its argument validation, before anything changes, when a required variable is missing.

The target host is unreachable (a closed loopback port): the validation runs on the controller, so the
run must fail there, on the first task, without ever connecting or changing anything.
"""

from __future__ import annotations

import json

import pytest

from lab.ansiblerun import run_playbook

pytestmark = pytest.mark.compat

UNREACHABLE = ("[targets]\nunreachable ansible_host=127.0.0.1 ansible_port=9 ansible_user=nobody "
               "ansible_connection=ssh ansible_ssh_common_args='-o ConnectTimeout=2'\n")

CASES = [
    # role, variables given, what the validation must name
    ("bastion_keys", {}, "missing required arguments: bastion_keys_bucket"),
    ("instance_profile", {"instance_profile_asg_names": ["web"]}, "missing required arguments: instance_profile_name"),
    ("dns_cache", {"dns_cache_upstreams": [{"port": 53}]}, "missing required arguments: address"),
]


@pytest.mark.parametrize("role,variables,message", CASES, ids=[case[0] for case in CASES])
def test_role_without_required_variable_stops_at_validation(role, variables, message):
    play = [{
        "name": "role without its required variables",
        "hosts": "targets",
        "gather_facts": False,
        "become": role != "instance_profile",
        "roles": [{"role": f"fleetkeeper.aws.{role}", "vars": variables}],
    }]
    run = run_playbook(play, inventory=UNREACHABLE)
    assert run.returncode == 2, (run.returncode, run.stdout[-3000:], run.stderr[-3000:])
    assert len(run.tasks) == 1, [task.name for task in run.tasks]
    (task,) = run.tasks
    assert "Validating arguments against arg spec 'main'" in task.name, task.name
    assert task.result.get("failed") and not task.result.get("unreachable"), task.result
    assert not task.result.get("changed"), task.result
    text = json.dumps(task.result)
    assert message in text, task.result.get("msg")
    assert "undefined" not in task.result.get("msg", "").lower(), task.result.get("msg")
    report = json.loads(run.stdout)
    stats = report["stats"]["unreachable"]
    assert stats["failures"] == 1 and stats["changed"] == 0 and stats["unreachable"] == 0 and stats["ok"] == 0, stats

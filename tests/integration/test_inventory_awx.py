# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet inventory as AWX runs it: `ansible-inventory --list --export` with temporary credentials.

AWX puts a temporary credential's token in both AWS_SESSION_TOKEN and AWS_SECURITY_TOKEN. amazon.aws 9 dates
the deprecation of the second; ansible-core 2.18 failed on that with KeyError 'version' and parsed no
inventory at all (plugins/plugin_utils/core_compat.py). The compat stage runs this on that pair.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from lab import fleet as fl
from lab.ansiblerun import BIN_DIR, ansible_env, plain

pytestmark = pytest.mark.compat


@pytest.mark.parametrize("tokens", [
    {"AWS_SESSION_TOKEN": "awx-temporary-token", "AWS_SECURITY_TOKEN": "awx-temporary-token"},
    {"AWS_SECURITY_TOKEN": "awx-temporary-token"},
    {"EC2_SECURITY_TOKEN": "awx-temporary-token"},
], ids=["awx", "security-token-only", "ec2-security-token"])
def test_export_with_temporary_credentials_in_the_environment(aws, tmp_path, tokens):
    fleet = fl.demo_fleet(aws, groups={"web": 2})
    source = tmp_path / "production.fleet.yml"
    source.write_text(json.dumps({"plugin": "fleetkeeper.aws.fleet", "regions": ["us-east-1"],
                                  "endpoint_url": aws.endpoint_url}))
    env = ansible_env({**aws.env(), **tokens, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True"})
    env.pop("ANSIBLE_DEPRECATION_WARNINGS", None)
    output = tmp_path / "awx.json"
    run = subprocess.run([os.path.join(BIN_DIR, "ansible-inventory"), "--list", "--export", "-i", str(source),
                          "--output", str(output), "--playbook-dir", str(tmp_path), "-vvv"],
                         env=env, capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "KeyError" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-4000:]
    data = plain(json.loads(output.read_text(encoding="utf-8")))
    ids = sorted(host["instance_id"] for host in data["_meta"]["hostvars"].values())
    assert ids == sorted(fleet.groups["web"]), data
    # A variable amazon.aws marks deprecated is still reported (by date), as amazon.aws asks.
    for name in set(tokens) & set(deprecated_env()):
        assert name + " option" in " ".join(run.stderr.split()), run.stderr[-3000:]


def deprecated_env():
    """The environment variables the installed amazon.aws marks deprecated for the session token."""
    from ansible_collections.amazon.aws.plugins.doc_fragments import common  # pylint: disable=import-outside-toplevel

    options = yaml.safe_load(common.ModuleDocFragment.PLUGINS)["options"]
    return [entry["name"] for entry in options["session_token"].get("env", []) if entry.get("deprecated")]

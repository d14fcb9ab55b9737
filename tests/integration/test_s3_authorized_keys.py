# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""s3_authorized_keys and the host-side entry point against the moto server.

Never touches this machine's accounts: every run uses ``user_backend:
directory`` below a per-test root (real accounts are exercised in the
Molecule scenario on test hosts).
"""

from __future__ import annotations

import json
import os
import time
import shutil
import subprocess
import sys

import pytest

from lab.ansiblerun import REPO_ROOT, run_module
from lab.fleet import upload_keys
from lab.keysync import (
    authorized_keys,
    directory_users,
    ed25519_line,
    host_files,
    render_entry_point,
    seed_directory_user,
)

BUCKET = "bastion-keys"
MODULE = "fleetkeeper.aws.s3_authorized_keys"


def args(aws, root, **extra):
    options = {"bucket": BUCKET, "endpoint_url": aws.endpoint_url, "region": "us-east-1",
               "user_backend": "directory", "root": str(root), "admin_users": ["admin"]}
    options.update(extra)
    return options


def snapshot(root):
    out = {}
    for base, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".lock") or name == "status.json":
                continue  # the lock, and each run's recorded outcome (which a failed run updates on purpose)
            path = os.path.join(base, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


@pytest.fixture
def bucket(aws):
    s3 = aws.client("s3")
    upload_keys(s3, BUCKET, {"alice": ed25519_line("alice@laptop"), "bob": ed25519_line("bob@desk")})
    aws.proxy.reset()
    return s3


@pytest.mark.compat
def test_check_diff_apply_idempotence(aws, bucket, tmp_path):
    root = tmp_path / "root"
    checked = run_module(MODULE, args(aws, root), env=aws.env(), check=True, diff=True)
    assert checked.changed and not checked.failed, checked.result
    assert sorted(checked["users_created"]) == ["alice", "bob"]
    assert "alice: ssh-ed25519 SHA256:" in checked["diff"]["after"] and checked["diff"]["before"] == ""
    assert not root.exists() or snapshot(root) == {}

    applied = run_module(MODULE, args(aws, root), env=aws.env(), diff=True)
    assert applied.changed and sorted(applied["users_created"]) == ["alice", "bob"], applied.result
    assert authorized_keys(root, "alice").endswith(" alice@laptop\n")
    assert applied["requests"] == {"list": 1, "get": 2}

    aws.proxy.reset()
    again = run_module(MODULE, args(aws, root), env=aws.env(), diff=True)
    assert not again.changed and again["requests"] == {"list": 1, "get": 0}, again.result
    assert aws.proxy.summary() == {"s3:ListObjectsV2": 1}

    # One key changed: one download, the diff names the key removed and the one added.
    new_key = ed25519_line("alice@new-laptop")
    upload_keys(bucket, BUCKET, {"alice": new_key}, create=False)
    aws.proxy.reset()
    changed = run_module(MODULE, args(aws, root), env=aws.env(), diff=True)
    assert changed.changed and changed["requests"] == {"list": 1, "get": 1}
    assert [k["user"] for k in changed["keys_added"]] == ["alice"]
    assert changed["keys_removed"][0]["key"].endswith("alice@laptop")
    assert authorized_keys(root, "alice") == new_key + "\n"

    # Key file removed: only that marked user is locked, on the next run.
    bucket.delete_object(Bucket=BUCKET, Key="keys/bob.pub")
    locked = run_module(MODULE, args(aws, root), env=aws.env())
    assert locked["users_locked"] == ["bob"] and authorized_keys(root, "bob") == ""
    assert directory_users(root)["users"]["alice"]["locked"] is False


@pytest.mark.compat
def test_bad_input_is_skipped_with_reasons_and_the_rest_syncs(aws, bucket, tmp_path):
    root = tmp_path / "root"
    seed_directory_user(root, "carol", 1005)  # an existing account, not ours
    upload_keys(bucket, BUCKET, {
        "root": ed25519_line("r"),
        "admin": ed25519_line("a"),
        "-oProxyCommand": ed25519_line("x"),
        "dave": 'command="/bin/sh -i",from="0.0.0.0/0" ' + ed25519_line("d"),
        "erin": "ssh-ed25519 not-base64!!\n" + ed25519_line("erin-ok"),
        "frank": "garbage\n",
        "carol": ed25519_line("c"),
        "Upper": ed25519_line("u"),
    }, create=False)
    bucket.put_object(Bucket=BUCKET, Key="keys/../x.pub", Body=ed25519_line("t").encode())
    bucket.put_object(Bucket=BUCKET, Key="keys/team/gina.pub", Body=ed25519_line("g").encode())
    bucket.put_object(Bucket=BUCKET, Key="keys/huge.pub", Body=(ed25519_line("h") + "\n#" + "x" * 20000).encode())
    bucket.put_object(Bucket=BUCKET, Key="keys/blob.pub", Body=b"\x00\x01binary")
    result = run_module(MODULE, args(aws, root), env=aws.env())
    assert not result.failed, result.result
    assert sorted(result["users_created"]) == ["alice", "bob", "erin"]
    reasons = {}
    for item in result["rejected"]:
        reasons.setdefault(item["object"], []).append(item["reason"])
    assert "reserved" in reasons["keys/root.pub"][0] and "reserved" in reasons["keys/admin.pub"][0]
    assert "portable POSIX" in reasons["keys/-oProxyCommand.pub"][0]
    assert "portable POSIX" in reasons["keys/Upper.pub"][0]
    assert any("'command' is not allowed" in r for r in reasons["keys/dave.pub"])
    assert any("base64" in r for r in reasons["keys/erin.pub"])
    assert any("no valid key" in r for r in reasons["keys/frank.pub"]) and "frank" not in directory_users(root)["users"]
    assert "never taken over" in reasons["keys/carol.pub"][0]
    assert "nested" in reasons["keys/team/"][0]  # one entry per folder, however many objects it holds
    assert "max_object_size" in reasons["keys/huge.pub"][0]
    assert any("binary" in r for r in reasons["keys/blob.pub"])
    assert "x" not in directory_users(root)["users"]
    assert authorized_keys(root, "erin").count("ssh-ed25519") == 1
    assert authorized_keys(root, "carol") is None and not os.path.exists(root / ".." / "x")
    # The module warns with each object's name.
    assert any("keys/root.pub" in w for w in result.get("warnings", []))
    # Refused names and the oversized object are never downloaded: alice bob blob carol dave erin frank are.
    assert aws.proxy.count("s3", "GetObject") == 7


@pytest.mark.parametrize("fault,operation", [
    ("deny", "ListObjectsV2"),
    ("truncate", "ListObjectsV2"),
])
def test_module_fails_closed(aws, bucket, tmp_path, fault, operation):
    root = tmp_path / "root"
    assert run_module(MODULE, args(aws, root), env=aws.env()).changed
    before = snapshot(root)
    upload_keys(bucket, BUCKET, {"alice": ed25519_line("rotated"), "carol": ed25519_line("new")}, create=False)
    bucket.delete_object(Bucket=BUCKET, Key="keys/bob.pub")
    aws.proxy.inject(fault, service="s3", operation=operation)
    result = run_module(MODULE, args(aws, root), env=aws.env())
    assert result.failed and "nothing was changed" in result["msg"], result.result
    assert snapshot(root) == before


@pytest.mark.parametrize("fault", ["deny", "truncate", "error"])
def test_module_a_failed_download_affects_only_its_user(aws, bucket, tmp_path, fault):
    root = tmp_path / "root"
    assert run_module(MODULE, args(aws, root), env=aws.env()).changed
    upload_keys(bucket, BUCKET, {"alice": ed25519_line("rotated"), "carol": ed25519_line("new")}, create=False)
    bucket.delete_object(Bucket=BUCKET, Key="keys/bob.pub")
    aws.proxy.inject(fault, service="s3", operation="GetObject")
    result = run_module(MODULE, args(aws, root), env=aws.env())
    assert result.failed, result.result
    failed = sorted(f["user"] for f in result["failures"])
    assert failed == ["alice", "carol"] and "alice" in result["msg"] and "carol" in result["msg"]
    assert result["users_locked"] == ["bob"] and result["users_created"] == []
    assert authorized_keys(root, "alice") == "" and "carol" not in directory_users(root)["users"]
    aws.proxy.clear_faults()
    again = run_module(MODULE, args(aws, root), env=aws.env())
    assert not again.failed and again["users_created"] == ["carol"], again.result
    assert authorized_keys(root, "alice").endswith(" rotated\n")


def test_module_refuses_an_empty_listing(aws, bucket, tmp_path):
    root = tmp_path / "root"
    run_module(MODULE, args(aws, root), env=aws.env())
    before = snapshot(root)
    for name in ("alice", "bob"):
        bucket.delete_object(Bucket=BUCKET, Key=f"keys/{name}.pub")
    result = run_module(MODULE, args(aws, root), env=aws.env())
    assert result.failed and "no valid key files" in result["msg"]
    assert snapshot(root) == before


def test_module_rides_out_brief_throttling(aws, bucket, tmp_path):
    aws.proxy.inject("throttle", service="s3", operation="ListObjectsV2", times=2)
    result = run_module(MODULE, args(aws, tmp_path / "root"), env=aws.env())
    assert result.changed and not result.failed, result.result
    assert [c.injected for c in aws.proxy.calls("s3", "ListObjectsV2")][:2] == ["throttle", "throttle"]


# --- the host-side entry point, installed as the role installs it -----------

@pytest.fixture
def host_tool(tmp_path):
    """/usr/local-like tree: sbin/fleetkeeper-keysync plus the module_utils copied unchanged."""
    prefix = tmp_path / "usr-local"
    lib = prefix / "lib" / "fleetkeeper-keysync" / "ansible_collections" / "fleetkeeper" / "aws" / "plugins" / "module_utils"
    lib.mkdir(parents=True)
    for name in host_files(REPO_ROOT):
        shutil.copy(os.path.join(REPO_ROOT, "plugins", "module_utils", name), lib / name)
    (prefix / "sbin").mkdir()
    script = prefix / "sbin" / "fleetkeeper-keysync"
    render_entry_point(REPO_ROOT, str(script), sys.executable)
    return script


def run_host(script, aws, config_path, *extra):
    env = dict(os.environ)
    env.update(aws.env())
    proc = subprocess.run([sys.executable, "-I", str(script), "--config", str(config_path), *extra],
                          capture_output=True, text=True, env=env, check=False, timeout=120)
    return proc


def host_config(tmp_path, aws, root, **extra):
    options = {"bucket": BUCKET, "endpoint_url": aws.endpoint_url, "region": "us-east-1", "root": str(root),
               "user_backend": "directory", "max_attempts": 2}
    options.update(extra)
    path = tmp_path / "keysync.json"
    path.write_text(json.dumps(options))
    return path


def test_host_tool_syncs_and_an_unchanged_bucket_costs_one_list(aws, bucket, tmp_path, host_tool):
    root = tmp_path / "root"
    config = host_config(tmp_path, aws, root)
    first = run_host(host_tool, aws, config)
    assert first.returncode == 0, first.stderr
    assert "created: alice, bob" in first.stdout
    aws.proxy.reset()
    second = run_host(host_tool, aws, config, "--json")
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert not result["changed"] and result["requests"] == {"list": 1, "get": 0}
    assert aws.proxy.summary() == {"s3:ListObjectsV2": 1}
    # The module and the host tool share the state file: the module sees nothing to do either.
    module = run_module(MODULE, args(aws, root), env=aws.env())
    assert not module.changed and module["requests"]["get"] == 0


@pytest.mark.parametrize("fault,operation,cause", [
    ("drop", "ListObjectsV2", "Connection"),
    ("deny", "ListObjectsV2", "AccessDenied"),
    ("error", "ListObjectsV2", "InternalError"),
    ("throttle", "ListObjectsV2", "SlowDown"),
    ("truncate", "ListObjectsV2", ""),
])
def test_host_tool_fails_closed_with_the_cause(aws, bucket, tmp_path, host_tool, fault, operation, cause):
    root = tmp_path / "root"
    config = host_config(tmp_path, aws, root)
    assert run_host(host_tool, aws, config).returncode == 0
    before = snapshot(root)
    upload_keys(bucket, BUCKET, {"alice": ed25519_line("rotated"), "carol": ed25519_line("new")}, create=False)
    bucket.delete_object(Bucket=BUCKET, Key="keys/bob.pub")
    aws.proxy.inject(fault, service="s3", operation=operation)
    proc = run_host(host_tool, aws, config)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "nothing was changed" in proc.stderr and cause in proc.stderr, proc.stderr
    assert snapshot(root) == before
    aws.proxy.clear_faults()
    after = run_host(host_tool, aws, config)
    assert after.returncode == 0 and "locked: bob" in after.stdout and "created: carol" in after.stdout, after.stdout


@pytest.mark.parametrize("fault,cause", [
    ("error", "InternalError"), ("throttle", "SlowDown"), ("truncate", "bytes"), ("drop", "Connection"),
    ("deny", "AccessDenied"),
])
def test_host_tool_a_failed_download_affects_only_its_user(aws, bucket, tmp_path, host_tool, fault, cause):
    root = tmp_path / "root"
    config = host_config(tmp_path, aws, root)
    assert run_host(host_tool, aws, config).returncode == 0
    upload_keys(bucket, BUCKET, {"carol": ed25519_line("new")}, create=False)
    bucket.delete_object(Bucket=BUCKET, Key="keys/bob.pub")
    aws.proxy.inject(fault, service="s3", operation="GetObject")
    proc = run_host(host_tool, aws, config)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "error: user carol: download:" in proc.stderr and cause in proc.stderr, proc.stderr
    assert "locked: bob" in proc.stdout and "carol" not in directory_users(root)["users"]
    aws.proxy.clear_faults()
    after = run_host(host_tool, aws, config)
    assert after.returncode == 0 and "created: carol" in after.stdout, after.stdout


def test_host_tool_reports_a_bad_config(aws, tmp_path, host_tool):
    config = tmp_path / "bad.json"
    config.write_text('{"bucket": "x", "mode": "shared_user"}')
    proc = run_host(host_tool, aws, config)
    assert proc.returncode == 2 and "needs shared_user" in proc.stderr


def test_module_reports_the_last_good_sync_in_check_mode_and_a_stale_host_fails_loudly(aws, bucket, tmp_path):
    root = tmp_path / "root"
    applied = run_module(MODULE, args(aws, root, max_sync_age=2), env=aws.env())
    assert applied["stale"] is False and applied["age"] == 0 and applied["last_success"].endswith("Z")
    checked = run_module(MODULE, args(aws, root, max_sync_age=2), env=aws.env(), check=True)
    assert checked["last_success"] == applied["last_success"] and checked["age"] >= 0, checked.result
    time.sleep(3)
    aws.proxy.inject("deny", service="s3", operation="ListObjectsV2", times=10)
    failed = run_module(MODULE, args(aws, root, max_sync_age=2, stale_action="lock"), env=aws.env())
    assert failed.failed and "STALE: revocations are not being applied" in failed["msg"], failed.result
    assert failed["stale"] is True and failed["age"] >= 3 and sorted(failed["locked"]) == ["alice", "bob"]
    assert all(directory_users(root)["users"][name]["locked"] for name in ("alice", "bob"))

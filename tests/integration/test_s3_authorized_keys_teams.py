# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""s3_authorized_keys with teams, against the moto server: the bucket's team manifest, each host's ``teams``.

Every run uses ``user_backend: directory`` below a per-test root, one root per "host" (the managed sudoers
drop-in is written below it too; visudo is not installed on this machine, which the backend records).
"""

from __future__ import annotations

import json
import os

import pytest

from lab.ansiblerun import run_module
from lab.fleet import upload_keys
from lab.keysync import authorized_keys, directory_users, ed25519_line

BUCKET = "bastion-keys"
MODULE = "fleetkeeper.aws.s3_authorized_keys"
SUDOERS = "etc/sudoers.d/fleetkeeper-keysync"
MEMBERS = {"ops": ["alice"], "db": ["alice", "bob"], "web": ["carol"], "contractors": ["dave"]}
# The bastion admits every team, as a forwarding-only account; each private host admits its own teams.
BASTION = {"teams": {"ops": {}, "db": {}, "web": {}, "contractors": {}}, "shell": "/usr/sbin/nologin",
           "prepend_options": ["restrict", "port-forwarding"]}
PRIVATE_DB = {"teams": {"ops": {"sudo": True}, "db": {"groups": ["dbadmin"]}}}
PRIVATE_WEB = {"teams": {"ops": {"sudo": True}, "web": {}}}


def args(aws, root, **extra):
    options = {"bucket": BUCKET, "endpoint_url": aws.endpoint_url, "region": "us-east-1",
               "user_backend": "directory", "root": str(root), "admin_users": ["admin"]}
    options.update(extra)
    return options


def put_manifest(s3, members):
    s3.put_object(Bucket=BUCKET, Key="keys/_teams.json", Body=json.dumps(members).encode())


def sudoers(root):
    path = os.path.join(str(root), SUDOERS)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def snapshot(root):
    out = {}
    for base, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".lock") or name == "status.json":
                continue
            path = os.path.join(base, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


@pytest.fixture
def bucket(aws):
    s3 = aws.client("s3")
    upload_keys(s3, BUCKET, dict((name, ed25519_line(name + "@laptop")) for name in ("alice", "bob", "carol", "dave")))
    put_manifest(s3, MEMBERS)
    aws.proxy.reset()
    return s3


def test_bastion_and_private_hosts_admit_their_teams_and_leaving_a_team_revokes(aws, bucket, tmp_path):
    roots = dict((name, tmp_path / name) for name in ("bastion", "db", "web"))
    configs = {"bastion": BASTION, "db": PRIVATE_DB, "web": PRIVATE_WEB}

    checked = run_module(MODULE, args(aws, roots["db"], **PRIVATE_DB), env=aws.env(), check=True)
    assert checked.changed and checked["sudoers_users"] == ["alice"] and not roots["db"].exists(), checked.result

    results = dict((host, run_module(MODULE, args(aws, roots[host], **configs[host]), env=aws.env()))
                   for host in roots)
    for host, result in results.items():
        assert result.changed and not result.failed, (host, result.result)
    # everyone passes through the bastion, forwarding only, with no shell and no sudo
    bastion = directory_users(roots["bastion"])["users"]
    assert sorted(bastion) == ["alice", "bob", "carol", "dave"]
    assert all(entry["shell"] == "/usr/sbin/nologin" for entry in bastion.values())
    assert authorized_keys(roots["bastion"], "bob").startswith("restrict,port-forwarding ssh-ed25519 ")
    assert sudoers(roots["bastion"]) is None and results["bastion"]["sudoers_users"] == []
    # bob (db) reaches the database host, not the web host; alice (ops) both, with sudo
    assert sorted(directory_users(roots["db"])["users"]) == ["alice", "bob"]
    assert sorted(directory_users(roots["web"])["users"]) == ["alice", "carol"]
    assert "bob" in results["web"]["users_not_admitted"] and "dave" in results["db"]["users_not_admitted"]
    assert "dbadmin" in directory_users(roots["db"])["users"]["bob"]["groups"]
    assert "dbadmin" in directory_users(roots["db"])["users"]["alice"]["groups"]
    for host in ("db", "web"):
        assert sudoers(roots[host]).splitlines()[1:] == ["alice ALL=(ALL:ALL) NOPASSWD: ALL"]
        assert oct(os.stat(roots[host] / SUDOERS).st_mode & 0o777) == "0o440"
        ops = directory_users(roots[host])["operations"]
        assert ["visudo-skipped", str(roots[host] / SUDOERS)] in ops

    # unchanged bucket: one LIST, no GET (the manifest is not downloaded again)
    aws.proxy.reset()
    again = run_module(MODULE, args(aws, roots["db"], **PRIVATE_DB), env=aws.env())
    assert not again.changed and again["requests"] == {"list": 1, "get": 0}, again.result
    assert aws.proxy.summary() == {"s3:ListObjectsV2": 1}

    # bob leaves db and alice leaves ops: bob is revoked on the db host, alice loses sudo in the same run
    put_manifest(bucket, dict(MEMBERS, ops=[], db=["alice"]))
    aws.proxy.reset()
    moved = run_module(MODULE, args(aws, roots["db"], **PRIVATE_DB), env=aws.env())
    assert moved.changed and not moved.failed, moved.result
    assert moved["users_revoked"] == ["bob"] and moved["users_locked"] == ["bob"]
    assert authorized_keys(roots["db"], "bob") == "" and directory_users(roots["db"])["users"]["bob"]["locked"]
    assert "dbadmin" not in directory_users(roots["db"])["users"]["bob"]["groups"]
    assert moved["sudoers_users"] == [] and sudoers(roots["db"]) is None
    assert moved["requests"] == {"list": 1, "get": 1}  # the manifest only: key objects are unchanged
    # ... and on the web host alice, in no admitted team any more, is revoked (carol stays)
    web = run_module(MODULE, args(aws, roots["web"], **PRIVATE_WEB), env=aws.env())
    assert web["users_revoked"] == ["alice"] and sudoers(roots["web"]) is None, web.result
    # the bastion: alice (still in db) keeps passing through, bob (in no team now) is revoked there too
    bastion = run_module(MODULE, args(aws, roots["bastion"], **BASTION), env=aws.env())
    assert bastion["users_revoked"] == ["bob"] and not directory_users(roots["bastion"])["users"]["alice"]["locked"]


def test_a_team_the_host_drops_is_revoked_and_a_bucket_team_grants_nothing(aws, bucket, tmp_path):
    root = tmp_path / "db"
    put_manifest(bucket, dict(MEMBERS, sudo=["carol"], wheel=["dave"]))
    first = run_module(MODULE, args(aws, root, **PRIVATE_DB), env=aws.env())
    # teams named like privileged groups exist in the bucket only: carol and dave get nothing here
    assert sorted(first["users_created"]) == ["alice", "bob"] and first["sudoers_users"] == ["alice"], first.result
    dropped = run_module(MODULE, args(aws, root, teams={"ops": {"sudo": True}}), env=aws.env())
    assert dropped["users_revoked"] == ["bob"], dropped.result
    assert dropped["users_groups_removed"] == [{"user": "alice", "groups": ["dbadmin"]}]
    users = directory_users(root)["users"]
    assert users["bob"]["locked"] and "dbadmin" not in users["bob"]["groups"] + users["alice"]["groups"]
    assert sudoers(root).splitlines()[1:] == ["alice ALL=(ALL:ALL) NOPASSWD: ALL"]


def test_a_host_that_admits_no_team_admits_nobody_only_when_told(aws, bucket, tmp_path):
    root = tmp_path / "db"
    assert run_module(MODULE, args(aws, root, **PRIVATE_DB), env=aws.env()).changed
    before = snapshot(root)
    refused = run_module(MODULE, args(aws, root, teams={}), env=aws.env())
    assert refused.failed and "no valid key files" in refused["msg"] and snapshot(root) == before
    emptied = run_module(MODULE, args(aws, root, teams={}, allow_empty=True), env=aws.env())
    assert not emptied.failed and sorted(emptied["users_revoked"]) == ["alice", "bob"], emptied.result
    assert sudoers(root) is None


@pytest.mark.parametrize("manifest", [None, b"{not json", b'{"ops": ["root\\n"]}'])
def test_a_missing_or_invalid_manifest_changes_nothing(aws, bucket, tmp_path, manifest):
    root = tmp_path / "db"
    assert run_module(MODULE, args(aws, root, **PRIVATE_DB), env=aws.env()).changed
    before = snapshot(root)
    if manifest is None:
        bucket.delete_object(Bucket=BUCKET, Key="keys/_teams.json")
    else:
        bucket.put_object(Bucket=BUCKET, Key="keys/_teams.json", Body=manifest)
    bucket.delete_object(Bucket=BUCKET, Key="keys/bob.pub")
    result = run_module(MODULE, args(aws, root, **PRIVATE_DB), env=aws.env())
    assert result.failed and "nothing was changed" in result["msg"] and "_teams.json" in result["msg"], result.result
    assert snapshot(root) == before


def test_a_manifest_download_that_fails_changes_nothing(aws, bucket, tmp_path):
    root = tmp_path / "db"
    assert run_module(MODULE, args(aws, root, **PRIVATE_DB), env=aws.env()).changed
    before = snapshot(root)
    put_manifest(bucket, dict(MEMBERS, db=["alice"]))
    aws.proxy.inject("deny", service="s3", operation="GetObject")
    result = run_module(MODULE, args(aws, root, **PRIVATE_DB), env=aws.env())
    assert result.failed and "_teams.json" in result["msg"], result.result
    assert snapshot(root) == before


def test_bad_teams_option_fails_with_the_reason(aws, bucket, tmp_path):
    result = run_module(MODULE, args(aws, tmp_path / "r", teams={"ops": {"root": True}}), env=aws.env())
    assert result.failed and "unknown key" in result["msg"], result.result


def test_listing_cost_with_teams_is_one_list_per_thousand_keys_and_no_get_when_unchanged(aws, tmp_path):
    s3 = aws.client("s3")
    names = ["user%04d" % i for i in range(1001)]
    upload_keys(s3, BUCKET, dict((name, ed25519_line(name)) for name in names))
    put_manifest(s3, dict(("team%02d" % t, names[t::20]) for t in range(20)))
    root = tmp_path / "host"
    teams = dict(("team%02d" % t, {"sudo": t == 0}) for t in range(10))
    first = run_module(MODULE, args(aws, root, teams=teams, uid_max=999999), env=aws.env())
    assert not first.failed, first.result.get("msg")
    assert first["requests"] == {"list": 2, "get": 1002}
    assert len(first["users_created"]) == 501 and len(first["sudoers_users"]) == 51
    aws.proxy.reset()
    again = run_module(MODULE, args(aws, root, teams=teams, uid_max=999999), env=aws.env())
    assert not again.changed and again["requests"] == {"list": 2, "get": 0}
    assert aws.proxy.summary() == {"s3:ListObjectsV2": 2}

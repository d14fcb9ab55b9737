# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Teams: the host's ``teams`` option, the bucket's team manifest, planning and the managed sudoers drop-in."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat

import pytest

from ansible_collections.fleetkeeper.aws.plugins.module_utils import keysync_store
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    SUDOERS_DROPIN,
    ConfigError,
    FailClosedError,
    KeySyncConfig,
    TeamsError,
    UserInfo,
    check_listing_size,
    parse_key_line,
    parse_teams_manifest,
    plan_per_user,
    render_sudoers,
    team_grants,
    validate_username,
)
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_s3 import sync
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import (
    DirectoryUserBackend,
    install_sudoers,
    make_backend,
    read_sudoers,
)
from lab.keysync import directory_users, ed25519_line
from tests.unit.fakes_aws import client_error

KEY = parse_key_line(ed25519_line("k"))
MARKER = "fleetkeeper-keys"


def config(**overrides):
    options = {"bucket": "keys-bucket", "admin_users": ["admin"]}
    options.update(overrides)
    return KeySyncConfig(**options)


def managed(name, uid, *groups, locked=False):
    return UserInfo(name, uid, uid, "/home/" + name, "/bin/bash", [MARKER, name] + list(groups), locked=locked)


def users(*infos):
    return dict((u.name, u) for u in infos)


TEAMS = {"ops": {"sudo": True}, "db": {"groups": ["dbadmin"]}, "contractors": {}}
MEMBERS = {"ops": ["alice"], "db": ["alice", "bob"], "contractors": ["carol"], "finance": ["dave"]}


# --- configuration ---------------------------------------------------------------

def test_teams_configuration_is_validated_and_normalised():
    cfg = config(teams={"ops": {"sudo": True, "groups": ["wheel2", "wheel2"]}, "db": None})
    assert cfg.teams == {"ops": {"sudo": True, "groups": ["wheel2"]}, "db": {"sudo": False, "groups": []}}
    assert config().teams is None and config(teams={}).teams == {}
    # a group a team grants is never a username
    assert "group the sync grants" in validate_username("wheel2", cfg)


@pytest.mark.parametrize("teams, message", [
    ({"Ops": {}}, "not a portable POSIX name"),
    ({"../x": {}}, "not a portable POSIX name"),
    ({"ops": {"sudo": "yes"}}, "sudo must be true or false"),
    ({"ops": {"admin": True}}, "unknown key"),
    ({"ops": {"groups": ["Bad Group"]}}, "group name"),
    ({"ops": {"groups": [MARKER]}}, "marker group"),
    ({"ops": ["sudo"]}, "must be a mapping"),
    (["ops"], "must be a mapping"),
])
def test_bad_teams_configuration_fails(teams, message):
    with pytest.raises(ConfigError, match=message):
        config(teams=teams)


def test_teams_need_per_user_mode():
    with pytest.raises(ConfigError, match="per_user"):
        config(teams={"ops": {}}, mode="shared_user", shared_user="ec2-user")


# --- the manifest ------------------------------------------------------------------

def test_manifest_is_parsed_and_validated():
    assert parse_teams_manifest(b'{"ops": ["bob", "alice", "bob"], "db": []}', config()) == {
        "ops": ["alice", "bob"], "db": []}


@pytest.mark.parametrize("data, message", [
    (b"not json", "not UTF-8 JSON"),
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b'["ops"]', "JSON object"),
    (b'{"Ops": ["alice"]}', "team name"),
    (b'{"ops\\n": ["alice"]}', "team name"),
    (b'{"ops": "alice"}', "list of usernames"),
    (b'{"ops": [1]}', "list of usernames"),
    (b'{"ops": ["alice\\n"]}', "member"),
    (b'{"ops": ["-oProxyCommand"]}', "member"),
])
def test_an_invalid_manifest_is_refused_whole(data, message):
    with pytest.raises(TeamsError, match=message):
        parse_teams_manifest(data, config())


def test_team_grants_are_the_union_of_admitted_teams_only():
    cfg = config(teams=TEAMS)
    assert team_grants("alice", MEMBERS, cfg) == (["db", "ops"], ["dbadmin"], True)
    assert team_grants("bob", MEMBERS, cfg) == (["db"], ["dbadmin"], False)
    # finance exists in the bucket only: it grants nothing here
    assert team_grants("dave", MEMBERS, cfg) == ([], [], False)
    assert team_grants("dave", MEMBERS, config()) == (None, [], False)


# --- planning ----------------------------------------------------------------------

def test_membership_union_decides_login_groups_and_sudo():
    cfg = config(teams=TEAMS)
    desired = {"alice": [KEY], "bob": [KEY], "carol": [KEY], "dave": [KEY]}
    plan = plan_per_user(desired, {}, cfg, {}, membership=MEMBERS, listed=sorted(desired))
    assert [name for name, _uid in plan.create] == ["alice", "bob", "carol"]
    assert plan.granted["alice"] == [MARKER, "dbadmin"] and plan.granted["carol"] == [MARKER]
    assert plan.sudoers == ["alice"]
    assert plan.not_admitted == ["dave"] and "dave" not in plan.keys
    assert plan.accepted == 3  # dave is not counted towards min_listing_ratio


def test_without_teams_everyone_is_admitted_flat_and_nobody_gets_sudo():
    desired = {"alice": [KEY], "dave": [KEY]}
    plan = plan_per_user(desired, {}, config(), {}, membership=MEMBERS)
    assert [name for name, _uid in plan.create] == ["alice", "dave"]
    assert plan.sudoers == [] and plan.granted["alice"] == [MARKER]


def test_a_host_that_admits_no_team_admits_nobody_and_revokes_everyone():
    existing = users(managed("alice", 30000), managed("bob", 30001))
    plan = plan_per_user({"alice": [KEY], "bob": [KEY]}, existing, config(teams={}), {}, membership=MEMBERS)
    assert sorted(r["user"] for r in plan.revoke) == ["alice", "bob"]
    assert all(r["lock"] for r in plan.revoke) and plan.keys == {"alice": [], "bob": []}
    assert plan.accepted == 0 and plan.sudoers == []
    # ... which the fail-closed check refuses unless allow_empty says it is meant
    with pytest.raises(FailClosedError):
        check_listing_size(plan.accepted, 2, config(teams={}))
    check_listing_size(plan.accepted, 2, config(teams={}, allow_empty=True))


def test_leaving_the_last_team_or_a_team_dropped_from_the_host_revokes():
    existing = users(managed("alice", 30000, "dbadmin"), managed("bob", 30001, "dbadmin"))
    history = {"granted": {"alice": [MARKER, "dbadmin"], "bob": [MARKER, "dbadmin"]}}
    desired = {"alice": [KEY], "bob": [KEY]}
    # bob leaves db: revoked like a deleted object, the team's group taken away
    left = dict(MEMBERS, db=["alice"])
    plan = plan_per_user(desired, existing, config(teams=TEAMS), history, membership=left)
    assert [r["user"] for r in plan.revoke] == ["bob"]
    assert plan.revoke[0]["lock"] and plan.revoke[0]["drop_groups"] == ["dbadmin"] and plan.keys["bob"] == []
    # the host drops db: alice stays through ops but loses dbadmin, bob is revoked
    plan = plan_per_user(desired, existing, config(teams={"ops": {"sudo": True}}), history, membership=MEMBERS)
    assert [r["user"] for r in plan.revoke] == ["bob"]
    assert plan.remove_groups == [("alice", ["dbadmin"])] and plan.granted["alice"] == [MARKER]
    assert plan.sudoers == ["alice"]


def test_losing_the_sudo_team_takes_sudo_away_in_the_plan():
    existing = users(managed("alice", 30000, "dbadmin"))
    history = {"granted": {"alice": [MARKER, "dbadmin"]}}
    before = plan_per_user({"alice": [KEY]}, existing, config(teams=TEAMS), history, membership=MEMBERS)
    after = plan_per_user({"alice": [KEY]}, existing, config(teams=TEAMS), history,
                          membership=dict(MEMBERS, ops=[]))
    assert before.sudoers == ["alice"] and after.sudoers == [] and after.revoke == []


def test_a_bucket_writer_cannot_add_a_team_or_admit_a_refused_account():
    cfg = config(teams=TEAMS)
    # a team of the writer's making, even one named like a privileged group, grants nothing
    members = {"sudo": ["mallory"], "wheel": ["mallory"], "ops": ["root", "admin"]}
    existing = users(UserInfo("admin", 1000, 1000, "/home/admin", "/bin/bash", [MARKER]))
    plan = plan_per_user({"mallory": [KEY], "root": [KEY], "admin": [KEY]}, existing, cfg, {}, membership=members)
    assert plan.create == [] and plan.sudoers == [] and plan.revoke == []
    assert plan.not_admitted == ["mallory"]
    reasons = dict((r["user"], r["reason"]) for r in plan.rejected)
    assert "reserved" in reasons["root"] and "reserved" in reasons["admin"]


def test_a_withheld_or_admin_locked_user_gets_no_sudo():
    existing = users(managed("alice", 30000, "dbadmin", locked=True))
    plan = plan_per_user({"alice": [KEY]}, existing, config(teams=TEAMS), {"locks_made": {}}, membership=MEMBERS)
    assert plan.admin_locked == ["alice"] and plan.sudoers == []
    plan = plan_per_user({}, users(managed("alice", 30000)), config(teams=TEAMS), {}, withheld=["alice"],
                         membership=MEMBERS)
    assert plan.withheld == ["alice"] and plan.sudoers == []


# --- the sudoers drop-in ----------------------------------------------------------

def test_render_sudoers():
    assert render_sudoers([]) == ""
    text = render_sudoers(["bob", "alice", "bob"])
    assert text.splitlines()[1:] == ["alice ALL=(ALL:ALL) NOPASSWD: ALL", "bob ALL=(ALL:ALL) NOPASSWD: ALL"]
    assert text.startswith("# Managed by fleetkeeper.aws")


def test_install_sudoers_writes_checks_rewrites_and_removes(tmp_path):
    root = str(tmp_path)
    ops = []
    path = os.path.join(root, SUDOERS_DROPIN.lstrip("/"))
    assert install_sudoers(root, [], None, lambda *op: ops.append(op), create_dir=True) is False
    assert install_sudoers(root, ["alice"], None, lambda *op: ops.append(op), create_dir=True) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o440 and read_sudoers(root) == render_sudoers(["alice"])
    assert ops[0] == ("visudo-skipped", path)
    assert install_sudoers(root, ["alice"], None, lambda *op: ops.append(op)) is False
    assert install_sudoers(root, ["alice", "bob"], None, lambda *op: ops.append(op)) is True
    assert "bob ALL=" in read_sudoers(root)
    assert install_sudoers(root, [], None, lambda *op: ops.append(op)) is True
    assert not os.path.exists(path) and ops[-1] == ("sudoers-removed", path)
    assert os.listdir(os.path.dirname(path)) == []  # no temp file left


def fake_visudo(tmp_path, exit_code):
    script = tmp_path / ("visudo-%d" % exit_code)
    script.write_text("#!/bin/sh\necho \"$@\" >> %s\necho 'parse error' >&2\nexit %d\n"
                      % (tmp_path / "visudo.args", exit_code))
    script.chmod(0o755)
    return str(script)


def test_a_drop_in_visudo_refuses_leaves_no_sudo_for_anyone(tmp_path):
    root = str(tmp_path / "root")
    path = os.path.join(root, SUDOERS_DROPIN.lstrip("/"))
    assert install_sudoers(root, ["alice"], fake_visudo(tmp_path, 0), lambda *op: None, create_dir=True)
    args = (tmp_path / "visudo.args").read_text().split()
    assert args[0] == "-cf" and os.path.dirname(args[1]) == os.path.dirname(path) and "." in os.path.basename(args[1])
    with pytest.raises(keysync_store.ApplyError, match="visudo -cf refused.*parse error"):
        install_sudoers(root, ["alice", "bob"], fake_visudo(tmp_path, 1), lambda *op: None)
    # revocation wins: not the old file either, and no temp file left behind
    assert not os.path.exists(path) and os.listdir(os.path.dirname(path)) == []


# --- one run through sync() ---------------------------------------------------------

class TinyS3:
    """ListObjectsV2 (one page, delimiter ignored: no nested objects here) and GetObject with If-Match; ``fail_get``
    maps a key to the botocore exception its GetObject raises."""

    def __init__(self):
        self.objects = {}
        self.calls = {"list": 0, "get": 0}
        self.gets = []
        self.fail_get = {}

    def etag(self, key):
        return '"%s"' % hashlib.md5(self.objects[key]).hexdigest()

    def list_objects_v2(self, Bucket, Prefix, MaxKeys, ContinuationToken=None, Delimiter=None):  # noqa: N803
        self.calls["list"] += 1
        keys = sorted(k for k in self.objects if k.startswith(Prefix))
        return {"KeyCount": len(keys), "IsTruncated": False,
                "Contents": [{"Key": k, "ETag": self.etag(k), "Size": len(self.objects[k])} for k in keys]}

    def get_object(self, Bucket, Key, IfMatch=None):  # noqa: N803
        self.calls["get"] += 1
        self.gets.append(Key)
        assert IfMatch == self.etag(Key)
        if Key in self.fail_get:
            raise self.fail_get[Key]
        return {"Body": io.BytesIO(self.objects[Key])}


def bucket(members, *names):
    s3 = TinyS3()
    for name in names:
        s3.objects["keys/%s.pub" % name] = (ed25519_line(name) + "\n").encode()
    if members is not None:
        s3.objects["keys/_teams.json"] = json.dumps(members).encode()
    return s3


def host(tmp_path, **overrides):
    options = {"bucket": "keys-bucket", "root": str(tmp_path / "root"), "user_backend": "directory",
               "admin_users": ["admin"], "teams": TEAMS, "min_listing_ratio": 0}
    options.update(overrides)
    return KeySyncConfig(**options)


def test_sync_sudo_lost_rewrites_the_drop_in_in_the_same_run_and_the_manifest_is_cached(tmp_path):
    cfg = host(tmp_path)
    s3 = bucket(MEMBERS, "alice", "bob", "carol", "dave")
    result = sync(cfg, s3, make_backend(cfg))
    assert sorted(result["users_created"]) == ["alice", "bob", "carol"] and result["users_not_admitted"] == ["dave"]
    assert result["sudoers_users"] == ["alice"] and read_sudoers(cfg.root) == render_sudoers(["alice"])
    db = directory_users(cfg.root)
    assert "dbadmin" in db["users"]["alice"]["groups"] and "dbadmin" in db["groups"]
    assert "teams: finance lists dave" not in json.dumps(result["rejected"])  # dave has a key object

    s3.calls = {"list": 0, "get": 0}
    again = sync(cfg, s3, make_backend(cfg))
    assert not again["changed"] and s3.calls == {"list": 1, "get": 0}

    # alice leaves ops (sudo) and db; she stays through contractors: no sudo, no dbadmin, still a login
    s3.objects["keys/_teams.json"] = json.dumps(dict(MEMBERS, ops=[], db=["bob"], contractors=["carol", "alice"])
                                                ).encode()
    s3.gets = []
    lost = sync(cfg, s3, make_backend(cfg))
    assert s3.gets == ["keys/_teams.json"]
    assert lost["sudoers_users"] == [] and read_sudoers(cfg.root) is None
    assert lost["users_groups_removed"] == [{"user": "alice", "groups": ["dbadmin"]}] and lost["users_revoked"] == []
    ops = [op[0] for op in directory_users(cfg.root)["operations"]]
    assert ops.index("sudoers-removed") < ops.index("gpasswd-delete")

    # bob leaves the last team: revoked through the same path as a deleted object
    s3.objects["keys/_teams.json"] = json.dumps(dict(MEMBERS, ops=[], db=[], contractors=["carol", "alice"])
                                                ).encode()
    gone = sync(cfg, s3, make_backend(cfg))
    assert gone["users_revoked"] == ["bob"] and gone["users_locked"] == ["bob"]
    assert directory_users(cfg.root)["users"]["bob"]["locked"]
    assert not os.path.exists(os.path.join(cfg.root, "home/bob/.ssh/authorized_keys")) or open(
        os.path.join(cfg.root, "home/bob/.ssh/authorized_keys")).read() == ""


@pytest.mark.parametrize("members, message", [
    (None, "does not exist"),
    ("not json", "not UTF-8 JSON"),
    ({"ops": ["alice\n"]}, "member"),
    ("denied", r"downloading s3://keys-bucket/keys/_teams.json failed: AccessDenied \(HTTP 403\): Access Denied"),
])
def test_sync_a_missing_or_invalid_manifest_changes_nothing(tmp_path, members, message):
    cfg = host(tmp_path)
    s3 = bucket(MEMBERS, "alice", "bob")
    sync(cfg, s3, make_backend(cfg))
    before = directory_users(cfg.root)
    sudoers = read_sudoers(cfg.root)
    if members is None:
        del s3.objects["keys/_teams.json"]
    elif members == "denied":  # a changed manifest (so it is downloaded again) that the host may not read
        s3.objects["keys/_teams.json"] = json.dumps(dict(MEMBERS, ops=["bob"])).encode()
        s3.fail_get["keys/_teams.json"] = client_error("AccessDenied", 403, operation="GetObject")
    else:
        s3.objects["keys/_teams.json"] = (members if isinstance(members, str) else json.dumps(members)).encode()
    del s3.objects["keys/bob.pub"]  # even the revocation a deleted object asks for waits: fail closed
    with pytest.raises(TeamsError, match=message):
        sync(cfg, s3, make_backend(cfg))
    assert directory_users(cfg.root) == before and read_sudoers(cfg.root) == sudoers


def test_sync_without_teams_ignores_the_manifest_and_removes_a_left_over_drop_in(tmp_path):
    cfg = host(tmp_path)
    s3 = bucket(MEMBERS, "alice", "dave")
    sync(cfg, s3, make_backend(cfg))
    assert read_sudoers(cfg.root) == render_sudoers(["alice"])
    flat = host(tmp_path, teams=None)
    s3.gets = []
    result = sync(flat, s3, make_backend(flat))
    # dave's object was verified in the first run already (the state keeps every listed object): no GET
    assert result["users_created"] == ["dave"] and s3.gets == []
    assert read_sudoers(flat.root) is None and result["sudoers_users"] == []
    assert not [r for r in result["rejected"] if "_teams.json" in r["object"]]


def test_a_team_group_that_cannot_be_made_fails_only_its_members(tmp_path, monkeypatch):
    cfg = host(tmp_path)
    s3 = bucket(MEMBERS, "alice", "bob", "carol")
    real = DirectoryUserBackend.ensure_group

    def ensure_group(self, name):
        if name == "dbadmin":
            raise keysync_store.UserBackendError("groupadd dbadmin failed")
        return real(self, name)

    monkeypatch.setattr(DirectoryUserBackend, "ensure_group", ensure_group)
    result = sync(cfg, s3, make_backend(cfg))
    assert result["users_created"] == ["carol"]
    assert sorted(f["user"] for f in result["failures"]) == ["alice", "bob"]
    # alice's sudo line goes with the account that was not created
    assert result["sudoers_users"] == [] and read_sudoers(cfg.root) is None


def test_a_forwarding_only_bastion_shell_does_not_read_as_locked(monkeypatch):
    """bastion_keys_shell: /usr/sbin/nologin gives every synced user that shell: only the lock's expiry counts."""
    import grp
    import pwd

    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import SystemUserBackend

    entries = [pwd.struct_passwd(("alice", "x", 30000, 30000, "", "/home/alice", "/usr/sbin/nologin")),
               pwd.struct_passwd(("bob", "x", 30001, 30001, "", "/home/bob", "/usr/sbin/nologin"))]
    monkeypatch.setattr(pwd, "getpwall", lambda: entries)
    monkeypatch.setattr(grp, "getgrall", lambda: [grp.struct_group((MARKER, "x", 500, ["alice", "bob"]))])
    monkeypatch.setattr(SystemUserBackend, "_shadow", staticmethod(
        lambda: {"alice": ["alice", "!", "", "", "", "", "", ""], "bob": ["bob", "!", "", "", "", "", "", "1"]}))
    flat = SystemUserBackend(runner=lambda argv: None).list_users()
    assert flat["alice"].locked and flat["bob"].locked  # a no-login shell someone else set
    bastion = SystemUserBackend(runner=lambda argv: None, shell="/usr/sbin/nologin").list_users()
    assert not bastion["alice"].locked and bastion["bob"].locked  # bob carries the lock's expiry
    assert make_backend(config(shell="/usr/sbin/nologin")).login_shell == "nologin"

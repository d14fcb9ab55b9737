# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Key sync runs with an in-memory S3 and the directory backend: files, symlinks, lock, fail-closed order, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
import threading
import time

import pytest

from ansible_collections.fleetkeeper.aws.plugins.module_utils import keysync_host
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    MARKER_LINE,
    ConfigError,
    FailClosedError,
    KeySyncConfig,
    ListingError,
    LockError,
    UnsafePathError,
    UserBackendError,
)
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_s3 import sync
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import (
    DirectoryUserBackend,
    SyncLock,
    SystemUserBackend,
    make_backend,
)
from lab.keysync import authorized_keys, directory_users, ed25519_line, seed_directory_user
from tests.unit.fakes_aws import client_error, endpoint_unreachable


class FakeS3:
    """Just enough of an S3 client: objects in a dict, optional failures, call counts.

    Failures are the exceptions a boto3 client raises (tests.unit.fakes_aws): ``ClientError`` for an AWS error
    response, ``EndpointConnectionError`` when nothing answers."""

    def __init__(self, objects=None, page_size=1000):
        self.objects = dict(objects or {})
        self.page_size = page_size
        self.calls = {"list": 0, "get": 0}
        self.fail_list = None
        self.fail_get = None
        self.fail_keys = {}       # key -> exception, or "truncate"
        self.cut_listing = False
        self.repeat_token = False
        self.get_delay = 0.0
        self.get_barrier = None  # a threading.Barrier every download waits on
        self.in_flight = 0
        self.max_in_flight = 0
        self._guard = threading.Lock()

    def list_objects_v2(self, Bucket, Prefix, MaxKeys, ContinuationToken=None, Delimiter=None):  # noqa: N803
        """ListObjectsV2 as S3 answers it: with a delimiter, keys below a further ``/`` roll up into one
        CommonPrefixes entry each, and both kinds count against MaxKeys."""
        self.calls["list"] += 1
        if self.fail_list:
            raise self.fail_list
        entries = []
        for key in sorted(k for k in self.objects if k.startswith(Prefix)):
            rest = key[len(Prefix):]
            if Delimiter and Delimiter in rest:
                folder = Prefix + rest.split(Delimiter, 1)[0] + Delimiter
                if not entries or entries[-1] != ("prefix", folder):
                    entries.append(("prefix", folder))
            else:
                entries.append(("key", key))
        start = int(ContinuationToken or 0)
        page = entries[start:start + min(MaxKeys, self.page_size)]
        truncated = start + len(page) < len(entries)
        result = {"KeyCount": len(page), "IsTruncated": truncated,
                  "Contents": [{"Key": k, "ETag": '"%s"' % hashlib.md5(self.objects[k]).hexdigest(),
                                "Size": len(self.objects[k])} for kind, k in page if kind == "key"]}
        prefixes = [{"Prefix": k} for kind, k in page if kind == "prefix"]
        if prefixes:
            result["CommonPrefixes"] = prefixes
        if truncated and not self.cut_listing:
            result["NextContinuationToken"] = "0" if self.repeat_token else str(start + len(page))
        return result

    def get_object(self, Bucket, Key, IfMatch=None):  # noqa: N803
        with self._guard:
            self.calls["get"] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.get_barrier is not None:
                self.get_barrier.wait()
            if self.get_delay:
                time.sleep(self.get_delay)
            if self.fail_get:
                raise self.fail_get
            fault = self.fail_keys.get(Key)
            if fault == "truncate":
                return {"Body": io.BytesIO(self.objects[Key][:-3])}
            if fault is not None:
                raise fault
            return {"Body": io.BytesIO(self.objects[Key])}
        finally:
            with self._guard:
                self.in_flight -= 1


def put(s3, users):
    for name, text in users.items():
        s3.objects["keys/%s.pub" % name] = text.encode()


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "root")


def make_config(root, **overrides):
    options = {"bucket": "keys-bucket", "root": root, "user_backend": "directory", "admin_users": ["admin"]}
    options.update(overrides)
    return KeySyncConfig(**options)


def run(config, s3, **kwargs):
    return sync(config, s3, make_backend(config), **kwargs)


def tree(root):
    """Every file below root with its content, to prove nothing changed."""
    out = {}
    for base, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            if name.endswith(".lock") or name == "status.json":
                continue  # the lock, and each run's recorded outcome (tested on its own)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


def test_first_sync_then_unchanged_costs_one_list_and_no_get(root):
    s3 = FakeS3(page_size=2)
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b"), "carol": ed25519_line("c")})
    config = make_config(root)
    first = run(config, s3)
    assert first["changed"] and sorted(first["users_created"]) == ["alice", "bob", "carol"]
    assert first["requests"] == {"list": 2, "get": 3}
    assert authorized_keys(root, "alice").startswith("ssh-ed25519 ")
    second = run(config, s3)
    assert not second["changed"] and second["requests"] == {"list": 2, "get": 0}


def test_check_mode_reports_and_writes_nothing(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    result = run(make_config(root), s3, check_mode=True)
    assert result["changed"] and result["users_created"] == ["alice"]
    assert "alice: ssh-ed25519 SHA256:" in result["diff"]["after"]
    assert tree(root) == {}


@pytest.mark.parametrize("fault", ["denied", "unreachable", "cut", "loop"])
def test_listing_trouble_changes_nothing(root, fault):
    s3 = FakeS3(page_size=1)
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b")})
    config = make_config(root)
    run(config, s3)
    before = tree(root)
    put(s3, {"alice": ed25519_line("new")})
    del s3.objects["keys/bob.pub"]
    put(s3, {"carol": ed25519_line("c")})
    says = {"denied": r"failed on page 1: AccessDenied \(HTTP 403\): Access Denied",
            "unreachable": "failed on page 1: EndpointConnectionError: Could not connect to the endpoint URL",
            "cut": "cut short", "loop": "repeated a continuation token"}[fault]
    if fault == "denied":
        s3.fail_list = client_error("AccessDenied", 403)
    elif fault == "unreachable":
        s3.fail_list = endpoint_unreachable()
    elif fault == "cut":
        s3.cut_listing = True
    else:
        s3.repeat_token = True
    with pytest.raises(ListingError, match=says + ".*nothing was changed"):
        run(config, s3)
    assert tree(root) == before


def test_objects_outside_the_layout_never_count_against_the_cap_and_too_many_keys_fail_closed(root):
    s3 = FakeS3(page_size=50)
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b")})
    for i in range(400):  # a flood of nested objects and other suffixes
        s3.objects["keys/flood/%d/x.pub" % i] = b"x"
        s3.objects["keys/junk%d.txt" % i] = b"x"
    config = make_config(root, max_keys=2)
    result = run(config, s3)
    assert sorted(result["users_created"]) == ["alice", "bob"]
    assert sum(1 for r in result["rejected"] if "nested" in r["reason"]) == 1  # keys/flood/: one entry, 400 objects
    # a nested flood costs one entry per folder, not per object
    assert result["requests"]["list"] == math.ceil((2 + 400 + 1) / 50)
    put(s3, {"carol": ed25519_line("c")})
    before = tree(root)
    with pytest.raises(ListingError, match="more than max_keys 2"):
        run(config, s3)
    assert tree(root) == before
    status = json.loads(open(os.path.join(root, "var/lib/fleetkeeper-keysync/status.json"), encoding="utf-8").read())
    assert status["last_outcome"] == "failed" and "max_keys" in status["last_error"]


@pytest.mark.parametrize("fault, says", [
    (("AccessDenied", 403), "AccessDenied (HTTP 403): Access Denied"),
    (("InvalidObjectState", 403), "InvalidObjectState (HTTP 403): The operation is not valid"),
    (("InternalError", 500), "InternalError (HTTP 500): We encountered an internal error"),
    ("truncate", "got %d bytes, the listing said %d"),
], ids=["kms-access-denied", "archived", "5xx", "truncated"])
def test_a_failed_download_affects_only_its_user(root, tmp_path, fault, says):
    s3 = FakeS3()
    alice_old = ed25519_line("a")
    put(s3, {"alice": alice_old, "bob": ed25519_line("b"), "dave": ed25519_line("d")})
    config = make_config(root)
    run(config, s3)
    put(s3, {"alice": ed25519_line("a2"), "carol": ed25519_line("c"), "erin": ed25519_line("e")})
    del s3.objects["keys/dave.pub"]
    if fault == "truncate":
        s3.fail_keys = {"keys/alice.pub": fault, "keys/carol.pub": fault}
        says = {"alice": says % (len(s3.objects["keys/alice.pub"]) - 3, len(s3.objects["keys/alice.pub"])),
                "carol": says % (len(s3.objects["keys/carol.pub"]) - 3, len(s3.objects["keys/carol.pub"]))}
    else:
        s3.fail_keys = {"keys/alice.pub": client_error(*fault, operation="GetObject"),
                        "keys/carol.pub": client_error(*fault, operation="GetObject")}
        says = {"alice": says, "carol": says}
    result = run(config, s3)
    failed = dict((f["user"], f["message"]) for f in result["failures"])
    assert set(failed) == {"alice", "carol"}
    for user in ("alice", "carol"):  # the object, and what S3 said about it
        assert "downloading s3://keys-bucket/keys/%s.pub failed: %s" % (user, says[user]) in failed[user], failed[user]
    assert "not created" in failed["carol"] and "carol" not in directory_users(root)["users"]
    assert authorized_keys(root, "alice") == ""  # nothing newer than verified, and not the old keys either
    assert result["users_created"] == ["erin"] and result["users_locked"] == ["dave"]
    assert authorized_keys(root, "bob").startswith("ssh-ed25519")
    out = io.StringIO()
    err = io.StringIO()
    path = write_config(tmp_path, root)
    assert keysync_host.main(["--config", path], s3_factory=lambda c: s3, stdout=out, stderr=err) == 1
    assert "error: user alice: download:" in err.getvalue() and "error: user carol: download:" in err.getvalue()
    assert says["alice"] in err.getvalue()
    s3.fail_keys = {}
    result = run(config, s3)
    assert result["failures"] == [] and result["users_created"] == ["carol"]
    assert authorized_keys(root, "alice").endswith(" a2\n")


def test_downloads_run_concurrently_within_the_bound(root):
    """8 workers download 8 objects at once, never more: each download waits until 8 are in flight (a
    barrier, no clock), so fewer workers would break the barrier and fail their users."""
    s3 = FakeS3()
    s3.get_barrier = threading.Barrier(8, timeout=30)
    put(s3, dict(("user%d" % i, ed25519_line()) for i in range(40)))
    result = run(make_config(root, download_workers=8), s3)
    assert not result["failures"] and len(result["users_created"]) == 40, result["failures"]
    assert s3.max_in_flight == 8 and s3.calls["get"] == 40


def test_far_smaller_listing_is_refused_until_the_ratio_allows_it(root):
    s3 = FakeS3()
    put(s3, dict(("user%d" % i, ed25519_line()) for i in range(10)))
    config = make_config(root)
    run(config, s3)
    before = tree(root)
    for i in range(6):
        del s3.objects["keys/user%d.pub" % i]
    with pytest.raises(FailClosedError, match="fewer than 50%"):
        run(config, s3)
    assert tree(root) == before
    result = run(make_config(root, min_listing_ratio=0.3), s3)
    assert sorted(result["users_locked"]) == ["user%d" % i for i in range(6)]
    assert authorized_keys(root, "user0") == ""
    assert directory_users(root)["users"]["user0"]["locked"] is True
    put(s3, {"user0": ed25519_line()})
    result = run(config, s3)
    assert result["users_unlocked"] == ["user0"] and authorized_keys(root, "user0").startswith("ssh-ed25519")


def test_existing_accounts_are_not_taken_over_and_admins_not_touched(root):
    seed_directory_user(root, "bob", 1001)
    seed_directory_user(root, "admin", 1000, groups=["fleetkeeper-keys"])
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b")})
    result = run(make_config(root), s3)
    assert result["users_created"] == ["alice"]
    assert any(r["user"] == "bob" and "never taken over" in r["reason"] for r in result["rejected"])
    assert authorized_keys(root, "bob") is None
    assert "admin" not in result["users_locked"]


def test_a_symlinked_ssh_dir_is_never_followed(root, tmp_path):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    config = make_config(root)
    run(config, s3)
    outside = tmp_path / "outside"
    outside.mkdir()
    ssh_dir = os.path.join(root, "home", "alice", ".ssh")
    os.unlink(os.path.join(ssh_dir, "authorized_keys"))
    os.rmdir(ssh_dir)
    os.symlink(str(outside), ssh_dir)
    put(s3, {"alice": ed25519_line("changed")})
    result = run(config, s3)
    assert list(outside.iterdir()) == []
    assert any("symlink" in r["reason"] for r in result["rejected"])


def test_a_symlinked_authorized_keys_is_replaced_not_followed(root, tmp_path):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    config = make_config(root)
    run(config, s3)
    target = tmp_path / "shadow"
    target.write_text("precious\n")
    path = os.path.join(root, "home", "alice", ".ssh", "authorized_keys")
    os.unlink(path)
    os.symlink(str(target), path)
    run(config, s3)
    assert target.read_text() == "precious\n"
    assert not os.path.islink(path) and authorized_keys(root, "alice").startswith("ssh-ed25519")


def test_root_owned_key_dir_and_modes(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    run(make_config(root, authorized_keys_dir="/etc/ssh/authorized_keys"), s3)
    path = os.path.join(root, "etc", "ssh", "authorized_keys", "alice")
    st = os.stat(path)
    assert oct(st.st_mode & 0o777) == "0o644" and st.st_uid == os.geteuid()
    home_ssh = os.path.join(root, "home", "alice", ".ssh")
    assert not os.path.exists(home_ssh)


def test_home_modes_are_0700_and_0600(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    run(make_config(root), s3)
    ssh_dir = os.path.join(root, "home", "alice", ".ssh")
    assert oct(os.stat(ssh_dir).st_mode & 0o777) == "0o700"
    assert oct(os.stat(os.path.join(ssh_dir, "authorized_keys")).st_mode & 0o777) == "0o600"
    if os.geteuid() == 0:
        uid = directory_users(root)["users"]["alice"]["uid"]
        assert os.stat(ssh_dir).st_uid == uid


def test_shared_user_owns_the_whole_file_static_keys_stay_hand_added_keys_go(root):
    seed_directory_user(root, "ec2-user", 1000)
    ssh_dir = os.path.join(root, "home", "ec2-user", ".ssh")
    os.makedirs(ssh_dir)
    static = ed25519_line("break-glass")
    planted_above = ed25519_line("planted-above")
    with open(os.path.join(ssh_dir, "authorized_keys"), "w", encoding="utf-8") as handle:
        handle.write(planted_above + "\n" + static + "\n")
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "bob": 'command="/bin/sh" ' + ed25519_line("b")})
    config = make_config(root, mode="shared_user", shared_user="ec2-user", static_keys=[static])
    result = run(config, s3)
    text = authorized_keys(root, "ec2-user")
    above, below = text.split(MARKER_LINE)
    assert static in above and "planted-above" not in text
    assert below.count("ssh-ed25519") == 1 and " a\n" in below
    assert any(r["user"] == "bob" for r in result["rejected"])
    assert any("planted-above" in k["key"] for k in result["keys_removed"])
    assert not run(config, s3)["changed"]
    # a key added by hand anywhere in the file - above or below the marker - is gone at the next run
    for where in ("top", "bottom"):
        with open(os.path.join(ssh_dir, "authorized_keys"), "r+", encoding="utf-8") as handle:
            current = handle.read()
            handle.seek(0)
            hand = ed25519_line("by-hand-" + where)
            handle.write(hand + "\n" + current if where == "top" else current + hand + "\n")
        result = run(config, s3)
        assert result["changed"] and "by-hand" not in authorized_keys(root, "ec2-user")


def test_static_keys_are_validated_and_only_for_shared_user(root):
    with pytest.raises(ConfigError, match="static_keys item 1"):
        make_config(root, mode="shared_user", shared_user="ec2-user", static_keys=["not a key"])
    with pytest.raises(ConfigError, match="shared_user"):
        make_config(root, static_keys=[ed25519_line("x")])


@pytest.mark.parametrize("body", ["this is not a key\n", "# only a comment\n",
                                  'command="/bin/sh" ' + ed25519_line("x") + "\n"],
                         ids=["garbage", "comments-only", "refused-option"])
def test_an_object_without_a_valid_key_revokes_like_a_deleted_one(root, body):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a") + "\n" + ed25519_line("a2"), "bob": ed25519_line("b")})
    config = make_config(root)
    run(config, s3)
    put(s3, {"alice": body})
    result = run(config, s3)
    assert result["users_revoked"] == ["alice"] and result["users_locked"] == ["alice"]
    assert authorized_keys(root, "alice") == "" and directory_users(root)["users"]["alice"]["locked"]
    warning = [r["reason"] for r in result["rejected"] if r["object"] == "keys/alice.pub" and r["line"] is None]
    assert warning and "revoked" in warning[0]


def test_an_edit_leaves_exactly_the_valid_keys_of_the_current_object(root):
    s3 = FakeS3()
    first, second = ed25519_line("one"), ed25519_line("two")
    put(s3, {"alice": first + "\n" + second, "bob": ed25519_line("b")})
    config = make_config(root)
    run(config, s3)
    put(s3, {"alice": second + "\nnot a key\n"})
    result = run(config, s3)
    assert authorized_keys(root, "alice") == second + "\n"
    assert any(r["user"] == "alice" and r["line"] == 2 for r in result["rejected"])


def test_oversized_objects_are_not_downloaded(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "big": ed25519_line("b") + "\n#" + "x" * 20000})
    result = run(make_config(root), s3)
    assert s3.calls["get"] == 1
    assert any(r["user"] == "big" and "max_object_size" in r["reason"] for r in result["rejected"])


def test_lock_is_exclusive(tmp_path):
    path = str(tmp_path / "lock")
    with SyncLock(path, 0):
        with pytest.raises(LockError, match="another key sync"):
            with SyncLock(path, 0.3):
                pass
    with SyncLock(path, 0):
        pass


def test_system_backend_uses_argument_lists(monkeypatch):
    commands = []
    backend = SystemUserBackend(runner=commands.append)
    monkeypatch.setattr(SystemUserBackend, "_shadow", staticmethod(lambda: {"alice": ["alice", "!", "", "", "", "",
                                                                                      "", "20500", ""]}))
    backend.create_user("alice", 23456, ["fleetkeeper-keys", "sudo"], "/bin/bash", "/home/alice")
    saved = backend.lock_user("alice")
    backend.unlock_user("alice", {"expiry": "20500", "shell": "/bin/zsh"})
    backend.unlock_user("alice", {"expiry": "", "shell": "/bin/bash"})
    backend.remove_user("alice")
    assert commands[0] == ["useradd", "--create-home", "--home-dir", "/home/alice", "--uid", "23456", "--user-group",
                           "--groups", "fleetkeeper-keys,sudo", "--shell", "/bin/bash", "--comment",
                           "managed by fleetkeeper.aws keysync", "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0",
                           "--", "alice"]
    assert saved["expiry"] == "20500"  # an administrator's expiry date, restored on unlock
    assert commands[1][:3] == ["usermod", "--expiredate", "1"] and commands[1][-2:] == ["--", "alice"]
    assert commands[2] == ["usermod", "--expiredate", "2026-02-16", "--shell", "/bin/zsh", "--", "alice"]
    assert commands[3][:3] == ["usermod", "--expiredate", ""]
    assert commands[4] == ["userdel", "--remove", "--", "alice"]
    assert all(isinstance(c, list) for c in commands)


def test_an_administrators_expiry_date_and_shell_survive_a_lock_unlock_cycle(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b")})
    config = make_config(root)
    run(config, s3)
    db_path = os.path.join(root, "etc", "fleetkeeper-users.json")
    db = json.load(open(db_path, encoding="utf-8"))
    db["users"]["alice"].update(expiry="30000", shell="/bin/zsh")  # set by an administrator
    json.dump(db, open(db_path, "w", encoding="utf-8"))
    del s3.objects["keys/alice.pub"]
    assert run(config, s3)["users_locked"] == ["alice"]
    assert directory_users(root)["users"]["alice"]["expiry"] == "1"
    put(s3, {"alice": ed25519_line("a")})
    assert run(config, s3)["users_unlocked"] == ["alice"]
    entry = directory_users(root)["users"]["alice"]
    assert (entry["expiry"], entry["shell"], entry["locked"]) == ("30000", "/bin/zsh", False)


def test_directory_backend_refuses_the_real_root():
    with pytest.raises(Exception, match="other than /"):
        DirectoryUserBackend("/")
    with pytest.raises(Exception, match="needs user_backend directory"):
        make_backend(KeySyncConfig(bucket="b", root="/tmp/x"))


def write_config(tmp_path, root, **extra):
    path = tmp_path / "keysync.json"
    options = {"bucket": "keys-bucket", "root": root, "user_backend": "directory"}
    options.update(extra)
    path.write_text(json.dumps(options))
    return str(path)


def test_host_entry_point_exit_codes(tmp_path, root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "root": ed25519_line("r")})
    out, err = io.StringIO(), io.StringIO()
    config_path = write_config(tmp_path, root)
    assert keysync_host.main(["--config", config_path], s3_factory=lambda c: s3, stdout=out, stderr=err) == 0
    assert "created: alice" in out.getvalue() and "keys/root.pub" in err.getvalue()
    s3.fail_list = client_error("AccessDenied", 403)
    err = io.StringIO()
    assert keysync_host.main(["--config", config_path], s3_factory=lambda c: s3, stdout=out, stderr=err) == 1
    assert "AccessDenied (HTTP 403): Access Denied" in err.getvalue() and "nothing was changed" in err.getvalue()
    assert "Traceback" not in err.getvalue()
    bad = write_config(tmp_path, root, mode="shared_user")
    assert keysync_host.main(["--config", bad], s3_factory=lambda c: s3, stdout=out, stderr=io.StringIO()) == 2
    s3.fail_list = None
    lock = os.path.join(root, "run", "fleetkeeper", "keysync.lock")
    with SyncLock(lock, 0):
        config_path = write_config(tmp_path, root, lock_timeout=0)
        assert keysync_host.main(["--config", config_path], s3_factory=lambda c: s3,
                                 stdout=out, stderr=io.StringIO()) == 75


# --- revocation first, each user on its own -------------------------------------------------------------------


class FlakyBackend(DirectoryUserBackend):
    """The directory backend with tool failures for chosen users, like useradd/userdel refusing."""

    def __init__(self, root, fail=None):
        super().__init__(root)
        self.fail = fail or {}

    def _maybe_fail(self, action, name):
        if (action, name) in self.fail:
            raise UserBackendError(self.fail[(action, name)])

    def create_user(self, name, uid, groups, shell, home):
        self._maybe_fail("create", name)
        super().create_user(name, uid, groups, shell, home)

    def remove_user(self, name):
        self._maybe_fail("userdel", name)
        super().remove_user(name)

    def lock_user(self, name):
        self._maybe_fail("lock", name)
        return super().lock_user(name)

    def remove_groups(self, name, groups):
        self._maybe_fail("remove groups", name)
        return super().remove_groups(name, groups)


def test_revocations_are_applied_before_any_creation_and_failures_stay_with_their_user(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b"), "dave": ed25519_line("d")})
    config = make_config(root, removal="remove")
    run(config, s3)
    del s3.objects["keys/bob.pub"]
    del s3.objects["keys/dave.pub"]
    put(s3, {"erin": ed25519_line("e"), "frank": ed25519_line("f")})
    backend = FlakyBackend(root, {
        ("create", "erin"): "useradd: group 'erin' already exists (exit 9)",
        ("userdel", "bob"): "userdel: user bob is currently used by process 4242 (exit 8)",
    })
    result = sync(config, s3, backend)
    ops = [op[0] for op in backend.operations]
    assert ops.index("useradd") > max(i for i, op in enumerate(ops) if op in ("lock", "userdel"))
    failed = dict((f["user"], (f["action"], f["message"])) for f in result["failures"])
    assert failed == {"erin": ("create", "useradd: group 'erin' already exists (exit 9)"),
                      "bob": ("userdel", "userdel: user bob is currently used by process 4242 (exit 8)")}
    db = directory_users(root)["users"]
    assert "dave" not in db and "frank" in db and "erin" not in db
    assert db["bob"]["locked"] is True and authorized_keys(root, "bob") == ""  # revoked though userdel failed
    assert result["users_removed"] == ["dave"] and sorted(result["users_locked"]) == ["bob", "dave"]
    state = json.load(open(os.path.join(root, "var/lib/fleetkeeper-keysync/state.json"), encoding="utf-8"))
    assert "bob" in state["locks_made"] and list(state["retired_uids"].values()) == ["dave"]
    # the next run retries userdel for bob, and erin's failure is reported again
    result = sync(config, s3, FlakyBackend(root, {("create", "erin"): "useradd: group 'erin' already exists"}))
    assert result["users_removed"] == ["bob"] and [f["user"] for f in result["failures"]] == ["erin"]


def test_the_marker_group_as_a_name_is_refused_and_the_run_goes_on(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "fleetkeeper-keys": ed25519_line("m")})
    result = run(make_config(root), s3)
    assert result["users_created"] == ["alice"]
    assert any(r["user"] == "fleetkeeper-keys" and "group" in r["reason"] for r in result["rejected"])


def test_a_failing_lock_still_takes_the_keys_and_the_next_run_retries(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b")})
    config = make_config(root, authorized_keys_dir="/etc/ssh/authorized_keys")
    run(config, s3)
    del s3.objects["keys/bob.pub"]
    result = sync(config, s3, FlakyBackend(root, {("lock", "bob"): "usermod: cannot lock /etc/shadow"}))
    assert [f["user"] for f in result["failures"]] == ["bob"]
    assert authorized_keys(root, "bob", "/etc/ssh/authorized_keys") is None  # key file gone regardless
    result = run(config, s3)
    assert result["users_locked"] == ["bob"] and result["failures"] == []


def test_a_removed_users_uid_is_never_handed_to_a_new_user(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    config = make_config(root, removal="remove", uid_min=20000, uid_max=20000, allow_empty=True)
    run(config, s3)
    del s3.objects["keys/alice.pub"]
    put(s3, {"bob": ed25519_line("b")})
    result = run(config, s3)
    assert result["users_removed"] == ["alice"] and result["users_created"] == []
    assert any(r["user"] == "bob" and "belongs to account 'alice'" in r["reason"] for r in result["rejected"])
    result = run(config, s3)  # alice is gone from the host, her UID is not: files she owned may remain
    assert result["users_created"] == []
    assert any(r["user"] == "bob" and "removed user 'alice'" in r["reason"] for r in result["rejected"])
    pinned = make_config(root, removal="remove", uid_min=20000, uid_max=20000, allow_empty=True,
                         uid_overrides={"bob": 20001})
    assert run(pinned, s3)["users_created"] == ["bob"]
    assert directory_users(root)["users"]["bob"]["uid"] == 20001


def test_locks_made_by_someone_else_are_never_undone(root):
    seed_directory_user(root, "carol", 30000, groups=["fleetkeeper-keys"])
    db_path = os.path.join(root, "etc", "fleetkeeper-users.json")
    db = json.load(open(db_path, encoding="utf-8"))
    db["users"]["carol"]["locked"] = True
    json.dump(db, open(db_path, "w", encoding="utf-8"))
    s3 = FakeS3()
    put(s3, {"carol": ed25519_line("c"), "dave": ed25519_line("d")})
    config = make_config(root)
    result = run(config, s3)
    assert result["users_unlocked"] == [] and result["users_locked_by_admin"] == ["carol"]
    assert directory_users(root)["users"]["carol"]["locked"] is True
    # a lock the sync made is undone when the object comes back
    del s3.objects["keys/dave.pub"]
    assert run(config, s3)["users_locked"] == ["dave"]
    put(s3, {"dave": ed25519_line("d")})
    result = run(config, s3)
    assert result["users_unlocked"] == ["dave"] and directory_users(root)["users"]["carol"]["locked"] is True


def test_groups_granted_by_the_sync_are_taken_back_when_the_configuration_drops_them(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    db_path = os.path.join(root, "etc", "fleetkeeper-users.json")
    os.makedirs(os.path.dirname(db_path))
    json.dump({"users": {}, "groups": ["sudo"], "operations": []}, open(db_path, "w", encoding="utf-8"))
    run(make_config(root, sudo_group="sudo"), s3)
    db = json.load(open(db_path, encoding="utf-8"))
    db["users"]["alice"]["groups"].append("docker")  # an administrator's grant
    json.dump(db, open(db_path, "w", encoding="utf-8"))
    result = run(make_config(root), s3)
    assert result["users_groups_removed"] == [{"user": "alice", "groups": ["sudo"]}]
    assert sorted(directory_users(root)["users"]["alice"]["groups"]) == ["alice", "docker", "fleetkeeper-keys"]
    assert not run(make_config(root), s3)["changed"]


def test_a_run_that_could_not_take_granted_groups_back_is_not_a_good_sync(root):
    """A group a user must lose (sudo) that could not be taken away is a revocation not applied: the run is
    partial, and last_success stays where it was, so max_sync_age and stale_action see it."""
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    db_path = os.path.join(root, "etc", "fleetkeeper-users.json")
    os.makedirs(os.path.dirname(db_path))
    json.dump({"users": {}, "groups": ["sudo"], "operations": []}, open(db_path, "w", encoding="utf-8"))
    status_path = os.path.join(root, "var/lib/fleetkeeper-keysync/status.json")
    config = make_config(root, sudo_group="sudo")
    sync(config, s3, FlakyBackend(root), now=1_000_000)
    good = json.load(open(status_path, encoding="utf-8"))["last_success"]
    result = sync(make_config(root), s3, FlakyBackend(root, {("remove groups", "alice"): "gpasswd: cannot lock /etc/group"}),
                  now=1_000_600)
    assert [(f["user"], f["action"]) for f in result["failures"]] == [("alice", "remove groups")]
    status = json.load(open(status_path, encoding="utf-8"))
    assert status["last_outcome"] == "partial" and status["last_success"] == good
    assert "sudo" in directory_users(root)["users"]["alice"]["groups"]
    result = sync(make_config(root), s3, FlakyBackend(root), now=1_001_200)
    assert result["failures"] == [] and "sudo" not in directory_users(root)["users"]["alice"]["groups"]
    assert json.load(open(status_path, encoding="utf-8"))["last_success"] != good
    # The same for a revoked user: sudo that could not be taken is taken at the next run.
    put(s3, {"bob": ed25519_line("b")})
    sync(config, s3, FlakyBackend(root), now=1_001_800)
    del s3.objects["keys/bob.pub"]
    result = sync(config, s3, FlakyBackend(root, {("remove groups", "bob"): "gpasswd: cannot lock /etc/group"}),
                  now=1_002_400)
    assert [(f["user"], f["action"]) for f in result["failures"]] == [("bob", "remove groups")]
    assert directory_users(root)["users"]["bob"]["locked"] is True and authorized_keys(root, "bob") == ""
    result = sync(config, s3, FlakyBackend(root), now=1_003_000)
    assert result["failures"] == [] and "sudo" not in directory_users(root)["users"]["bob"]["groups"]


# --- local files that must not be read ------------------------------------------------------------------------


def _keys_path(root, name="alice"):
    return os.path.join(root, "home", name, ".ssh", "authorized_keys")


class PlantedNodeWatch:
    """Every ``os.open`` and ``os.read`` made while it is installed, held against one planted node (its device and
    inode): the bytes read from it, and each open of it that would block (a FIFO opened without O_NONBLOCK, and
    not as a directory, which fails with ENOTDIR at once, raises here instead of hanging the run). No clock:
    "replaced unread" is counted, not timed."""

    def __init__(self, monkeypatch, path):
        st = os.lstat(path)
        self.node, self.fifo = (st.st_dev, st.st_ino), stat.S_ISFIFO(st.st_mode)
        self.bytes_read = 0
        self.blocking_opens = 0
        real_open, real_read = os.open, os.read

        def watched_open(name, flags, mode=0o777, *, dir_fd=None):
            try:
                target = os.stat(name, dir_fd=dir_fd, follow_symlinks=not flags & getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                target = None
            if target is not None and (target.st_dev, target.st_ino) == self.node and self.fifo \
                    and not flags & (os.O_NONBLOCK | getattr(os, "O_PATH", 0) | getattr(os, "O_DIRECTORY", 0)):
                self.blocking_opens += 1
                raise AssertionError("a blocking open of the planted FIFO %s: the run would hang" % path)
            return real_open(name, flags, mode, dir_fd=dir_fd)

        def watched_read(fd, length):
            data = real_read(fd, length)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == self.node:
                self.bytes_read += len(data) or 1  # an empty read (EOF, an empty FIFO) still read the node
            return data

        monkeypatch.setattr(os, "open", watched_open)
        monkeypatch.setattr(os, "read", watched_read)

    def assert_unread(self):
        assert (self.bytes_read, self.blocking_opens) == (0, 0), "the planted node was read or opened blocking"


@pytest.mark.parametrize("kind", ["fifo", "hardlink", "huge", "socket", "foreign-owner", "ssh-dir-fifo"])
def test_unsafe_local_files_are_replaced_unread_in_per_user_mode(root, tmp_path, monkeypatch, kind):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    config = make_config(root)
    run(config, s3)
    path = _keys_path(root)
    os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "hardlink":
        other = tmp_path / "elsewhere"
        other.write_text("precious\n")
        os.link(str(other), path)
    elif kind == "huge":
        with open(path, "wb") as handle:
            handle.truncate(1 << 30)  # sparse 1 GiB
    elif kind == "socket":
        import socket
        sock = socket.socket(socket.AF_UNIX)
        # Bind by a relative name: a socket path is limited to 107 bytes, and pytest-xdist's temp paths are long.
        cwd = os.getcwd()
        os.chdir(os.path.dirname(path))
        try:
            sock.bind(os.path.basename(path))
        finally:
            os.chdir(cwd)
    elif kind == "foreign-owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file another owner")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("ssh-ed25519 AAAA planted\n")
        os.chown(path, 54321, 54321)
    else:
        os.rmdir(os.path.dirname(path))
        os.mkfifo(os.path.dirname(path))
    put(s3, {"alice": ed25519_line("changed")})
    watch = PlantedNodeWatch(monkeypatch, os.path.dirname(path) if kind == "ssh-dir-fifo" else path)
    result = run(config, s3)
    watch.assert_unread()
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size < 1000
    assert authorized_keys(root, "alice").endswith(" changed\n")
    if kind == "hardlink":
        assert (tmp_path / "elsewhere").read_text() == "precious\n"
    assert any(r["user"] == "alice" and "replaced" in r["reason"] for r in result["rejected"])


@pytest.mark.parametrize("kind", ["fifo", "hardlink", "huge"])
def test_unsafe_local_files_are_replaced_unread_in_shared_user_mode_never_copied(root, tmp_path, monkeypatch, kind):
    seed_directory_user(root, "ec2-user", 1000)
    ssh_dir = os.path.join(root, "home", "ec2-user", ".ssh")
    os.makedirs(ssh_dir)
    path = os.path.join(ssh_dir, "authorized_keys")
    secret = tmp_path / "secret"
    secret.write_text("root:$6$hash:...\n")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "hardlink":
        os.link(str(secret), path)
    else:
        with open(path, "wb") as handle:
            handle.truncate(1 << 30)
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    watch = PlantedNodeWatch(monkeypatch, path)
    result = run(make_config(root, mode="shared_user", shared_user="ec2-user"), s3)
    watch.assert_unread()
    assert result["failures"] == []
    assert any(r["user"] == "ec2-user" and "replaced" in r["reason"] for r in result["rejected"])
    text = authorized_keys(root, "ec2-user")
    assert "$6$" not in text and " a\n" in text
    assert secret.read_text() == "root:$6$hash:...\n"
    assert os.stat(str(secret)).st_nlink == 1  # the link in ~/.ssh was replaced, the file it shared left alone


# --- lock and state paths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symlink-file", "symlink-dir", "world-writable-dir", "foreign-dir"])
def test_unsafe_lock_paths_are_refused_with_a_clear_message(tmp_path, root, kind):
    lock_dir = os.path.join(root, "run", "fleetkeeper")
    os.makedirs(os.path.dirname(lock_dir), exist_ok=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if kind == "symlink-file":
        os.mkdir(lock_dir, 0o700)
        os.symlink(str(elsewhere / "target"), os.path.join(lock_dir, "keysync.lock"))
    elif kind == "symlink-dir":
        os.symlink(str(elsewhere), lock_dir)
    elif kind == "world-writable-dir":
        os.mkdir(lock_dir)
        os.chmod(lock_dir, 0o1777)
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory another owner")
        os.mkdir(lock_dir, 0o700)
        os.chown(lock_dir, 54321, 54321)
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    with pytest.raises(UnsafePathError):
        run(make_config(root), s3)
    assert not os.path.exists(elsewhere / "target")
    out, err = io.StringIO(), io.StringIO()
    path = write_config(tmp_path, root)
    assert keysync_host.main(["--config", path], s3_factory=lambda c: s3, stdout=out, stderr=err) == 1
    assert "refusing" in err.getvalue() or "only root can write" in err.getvalue()
    assert "Traceback" not in err.getvalue() and directory_users(root) == {}


def test_the_default_lock_lives_in_a_root_only_directory(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    run(make_config(root), s3)
    for directory in ("run/fleetkeeper", "var/lib/fleetkeeper-keysync"):
        st = os.stat(os.path.join(root, directory))
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()


# --- the system backend's process and group commands ----------------------------------------------------------


# --- every "no access" revokes; removed keys end sessions; writes that fail leave no keys; staleness ---------------


class RecordingBackend(DirectoryUserBackend):
    """The directory backend, remembering whose sessions the sync ended (it has no processes to end)."""

    def __init__(self, root):
        super().__init__(root)
        self.ended = []
        self.ended_keys = []

    def end_sessions(self, name, uid, gid, fresh=True):
        self.ended.append(name)
        return True

    def end_key_sessions(self, account, fingerprints):
        self.ended_keys.append((account, sorted(fingerprints)))
        return [4242]


@pytest.mark.parametrize("how", ["deny_users", "emptied", "every-key-refused", "deleted"])
def test_every_way_of_saying_no_access_revokes_like_a_deleted_object(root, how):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b"), "carol": ed25519_line("c")})
    run(make_config(root), s3)
    config = make_config(root, deny_users=["bob"] if how == "deny_users" else [])
    if how == "emptied":
        s3.objects["keys/bob.pub"] = b""
    elif how == "every-key-refused":
        put(s3, {"bob": 'command="/bin/sh" ' + ed25519_line("b")})
    elif how == "deleted":
        del s3.objects["keys/bob.pub"]
    backend = RecordingBackend(root)
    result = sync(config, s3, backend)
    assert result["users_revoked"] == ["bob"] and result["users_locked"] == ["bob"]
    assert authorized_keys(root, "bob") == "" and backend.ended == ["bob"]
    assert directory_users(root)["users"]["bob"]["locked"] is True


def test_removal_keep_ends_sessions_and_retires_jobs_but_leaves_the_account(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b")})
    config = make_config(root, removal="keep")
    run(config, s3)
    del s3.objects["keys/bob.pub"]
    backend = RecordingBackend(root)
    result = sync(config, s3, backend)
    assert result["users_revoked"] == ["bob"] and result["users_locked"] == [] and backend.ended == ["bob"]
    assert ["retire", "bob", True] in directory_users(root)["operations"]
    assert directory_users(root)["users"]["bob"]["locked"] is False and authorized_keys(root, "bob") == ""


def test_a_removed_key_ends_the_users_sessions_in_per_user_mode(root):
    s3 = FakeS3()
    first, second, third = ed25519_line("a1"), ed25519_line("a2"), ed25519_line("a3")
    put(s3, {"alice": first + "\n" + second, "bob": ed25519_line("b")})
    config = make_config(root)
    run(config, s3)
    put(s3, {"alice": first})
    backend = RecordingBackend(root)
    sync(config, s3, backend)
    assert backend.ended == ["alice"]
    backend = RecordingBackend(root)
    put(s3, {"alice": first + "\n" + third})  # a key added: nothing ends
    sync(config, s3, backend)
    assert backend.ended == []


def test_shared_user_ends_exactly_the_sessions_of_removed_keys(root):
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import parse_key_line
    seed_directory_user(root, "ec2-user", 1000)
    s3 = FakeS3()
    bob_line = ed25519_line("b")
    put(s3, {"alice": ed25519_line("a"), "bob": bob_line})
    config = make_config(root, mode="shared_user", shared_user="ec2-user")
    run(config, s3)
    bob = parse_key_line(bob_line).fingerprint
    del s3.objects["keys/bob.pub"]
    backend = RecordingBackend(root)
    result = sync(config, s3, backend)
    assert backend.ended_keys == [("ec2-user", [bob])] and backend.ended == []
    assert result["sessions_ended"] == [{"user": "ec2-user", "pid": 4242}]


def test_a_key_file_that_cannot_be_written_leaves_no_keys_never_the_old_ones(root, monkeypatch):
    from ansible_collections.fleetkeeper.aws.plugins.module_utils import keysync_store
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("old"), "bob": ed25519_line("b")})
    config = make_config(root)
    run(config, s3)
    put(s3, {"alice": ed25519_line("new")})

    real = keysync_store.atomic_write_in_dir

    def refuse(dir_fd, name, text, owner, mode, sync_dir=True):
        if name == "authorized_keys":
            raise OSError(28, "No space left on device")
        return real(dir_fd, name, text, owner, mode, sync_dir)

    monkeypatch.setattr(keysync_store, "atomic_write_in_dir", refuse)
    result = run(config, s3)
    assert authorized_keys(root, "alice") is None  # removed, not left with the old key
    assert any(f["user"] == "alice" and "has no keys" in f["message"] for f in result["failures"])


def test_a_temp_name_planted_by_the_user_cannot_block_the_write(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("old"), "bob": ed25519_line("b")})
    config = make_config(root)
    run(config, s3)
    ssh_dir = os.path.dirname(_keys_path(root))
    for pid in range(os.getpid() - 50, os.getpid() + 50):  # every name the old, predictable scheme could use
        os.mkdir(os.path.join(ssh_dir, ".authorized_keys.fk-%d" % pid))
    put(s3, {"alice": ed25519_line("new")})
    result = run(config, s3)
    assert result["failures"] == [] and authorized_keys(root, "alice").endswith(" new\n")


def test_each_run_records_its_outcome_and_a_stale_host_is_loud_and_can_lock(root):
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b")})
    config = make_config(root, max_sync_age=3600, stale_action="lock")
    start = 1_800_000_000
    result = sync(config, s3, make_backend(config), now=start)
    assert result["stale"] is False and result["age"] == 0 and result["last_success"] == "2027-01-15T08:00:00Z"
    s3.fail_list = client_error("AccessDenied", 403)
    with pytest.raises(ListingError, match=r"AccessDenied \(HTTP 403\)") as caught:
        sync(config, s3, make_backend(config), now=start + 600)
    assert not getattr(caught.value, "stale", None)  # 10 minutes: not stale yet, nobody locked
    assert directory_users(root)["users"]["alice"]["locked"] is False
    with pytest.raises(ListingError) as caught:
        sync(config, s3, make_backend(config), now=start + 3700)
    assert caught.value.stale["stale"] is True and caught.value.stale["age"] == 3700
    assert caught.value.stale["locked"] == ["alice", "bob"]
    assert all(u["locked"] for n, u in directory_users(root)["users"].items() if n in ("alice", "bob"))
    report = sync(config, FakeS3(s3.objects), make_backend(config), check_mode=True,
                  now=start + 3800)
    assert report["stale"] is True and report["age"] == 3800
    # the bucket is readable again: the next good sync unlocks them and the host is fresh
    s3.fail_list = None
    result = sync(config, s3, make_backend(config), now=start + 4000)
    assert sorted(result["users_unlocked"]) == ["alice", "bob"] and result["stale"] is False


def test_the_host_tool_says_stale_at_error_priority_and_fails(tmp_path, root, monkeypatch):
    config_path = tmp_path / "keysync.json"
    config_path.write_text(json.dumps({"bucket": "keys-bucket", "root": root, "user_backend": "directory",
                                       "max_sync_age": 1}))
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a")})
    # The last good sync, an hour ago by an injected clock (max_sync_age is 1 s): no sleeping, no race.
    config = keysync_host.load_config(str(config_path))
    assert sync(config, s3, make_backend(config), now=time.time() - 3600)["stale"] is False
    s3.fail_list = client_error("AccessDenied", 403)
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    err = io.StringIO()
    assert keysync_host.main(["--config", str(config_path)], s3_factory=lambda c: s3, stdout=io.StringIO(),
                             stderr=err) == keysync_host.EXIT_FAILED
    assert "<3>fleetkeeper-keysync: STALE: revocations are not being applied" in err.getvalue()

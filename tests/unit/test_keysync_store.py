# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Key sync runs with an in-memory S3 and the directory backend: files, symlinks, lock, fail-closed order, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import threading
import time

import pytest

from ansible_collections.fleetkeeper.aws.plugins.module_utils import keysync_host
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    MARKER_LINE,
    DownloadError,
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
from tests.support.keysync import authorized_keys, directory_users, ed25519_line, seed_directory_user


class FakeS3:
    """Just enough of an S3 client: objects in a dict, optional failures, call counts."""

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
        self.in_flight = 0
        self.max_in_flight = 0
        self._guard = threading.Lock()

    def list_objects_v2(self, Bucket, Prefix, MaxKeys, ContinuationToken=None):  # noqa: N803 - boto3 names
        self.calls["list"] += 1
        if self.fail_list:
            raise self.fail_list
        keys = sorted(k for k in self.objects if k.startswith(Prefix))
        start = int(ContinuationToken or 0)
        page = keys[start:start + min(MaxKeys, self.page_size)]
        truncated = start + len(page) < len(keys)
        result = {"KeyCount": len(page), "IsTruncated": truncated,
                  "Contents": [{"Key": k, "ETag": '"%s"' % hashlib.md5(self.objects[k]).hexdigest(),
                                "Size": len(self.objects[k])} for k in page]}
        if truncated and not self.cut_listing:
            result["NextContinuationToken"] = "0" if self.repeat_token else str(start + len(page))
        return result

    def get_object(self, Bucket, Key, IfMatch=None):  # noqa: N803
        with self._guard:
            self.calls["get"] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
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
            if name.endswith(".lock"):
                continue
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


@pytest.mark.parametrize("fault", ["list", "cut", "loop"])
def test_listing_trouble_changes_nothing(root, fault):
    s3 = FakeS3(page_size=1)
    put(s3, {"alice": ed25519_line("a"), "bob": ed25519_line("b")})
    config = make_config(root)
    run(config, s3)
    before = tree(root)
    put(s3, {"alice": ed25519_line("new")})
    del s3.objects["keys/bob.pub"]
    put(s3, {"carol": ed25519_line("c")})
    if fault == "list":
        s3.fail_list = RuntimeError("endpoint down")
        expected = ListingError
    elif fault == "cut":
        s3.cut_listing = True
        expected = ListingError
    else:
        s3.repeat_token = True
        expected = ListingError
    with pytest.raises(expected, match="nothing was changed"):
        run(config, s3)
    assert tree(root) == before


def test_a_listing_with_more_pages_than_any_prefix_holds_aborts(root):
    from ansible_collections.fleetkeeper.aws.plugins.module_utils import keysync_s3
    s3 = FakeS3(page_size=1)
    put(s3, dict(("user%d" % i, ed25519_line()) for i in range(5)))
    counter = keysync_s3.RequestCounter()
    with pytest.raises(ListingError, match="past 3 pages"):
        keysync_s3.list_key_objects(s3, "keys-bucket", "keys/", counter, max_pages=3)


class Error(Exception):
    def __init__(self, code, status):
        super().__init__(code)
        self.response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


@pytest.mark.parametrize("fault", [Error("AccessDenied", 403), Error("InvalidObjectState", 403),
                                   Error("InternalError", 500), "truncate"],
                         ids=["kms-access-denied", "archived", "5xx", "truncated"])
def test_a_failed_download_affects_only_its_user(root, tmp_path, fault):
    s3 = FakeS3()
    alice_old = ed25519_line("a")
    put(s3, {"alice": alice_old, "bob": ed25519_line("b"), "dave": ed25519_line("d")})
    config = make_config(root)
    run(config, s3)
    put(s3, {"alice": ed25519_line("a2"), "carol": ed25519_line("c"), "erin": ed25519_line("e")})
    del s3.objects["keys/dave.pub"]
    s3.fail_keys = {"keys/alice.pub": fault, "keys/carol.pub": fault}
    result = run(config, s3)
    failed = dict((f["user"], f["message"]) for f in result["failed"])
    assert set(failed) == {"alice", "carol"} and "keys/alice.pub" in failed["alice"]
    assert "not created" in failed["carol"] and "carol" not in directory_users(root)["users"]
    assert authorized_keys(root, "alice") == ""  # nothing newer than verified, and not the old keys either
    assert result["users_created"] == ["erin"] and result["users_locked"] == ["dave"]
    assert authorized_keys(root, "bob").startswith("ssh-ed25519")
    out = io.StringIO()
    err = io.StringIO()
    path = write_config(tmp_path, root)
    assert keysync_host.main(["--config", path], s3_factory=lambda c: s3, stdout=out, stderr=err) == 1
    assert "error: user alice: download:" in err.getvalue() and "error: user carol: download:" in err.getvalue()
    s3.fail_keys = {}
    result = run(config, s3)
    assert result["failed"] == [] and result["users_created"] == ["carol"]
    assert authorized_keys(root, "alice").endswith(" a2\n")


def test_downloads_run_concurrently_within_the_bound(root):
    s3 = FakeS3()
    s3.get_delay = 0.05
    put(s3, dict(("user%d" % i, ed25519_line()) for i in range(40)))
    started = time.monotonic()
    run(make_config(root, download_workers=8), s3)
    assert s3.max_in_flight == 8
    assert time.monotonic() - started < 40 * 0.05 / 2


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


def test_shared_user_keeps_break_glass_lines(root):
    seed_directory_user(root, "ec2-user", 1000)
    ssh_dir = os.path.join(root, "home", "ec2-user", ".ssh")
    os.makedirs(ssh_dir)
    with open(os.path.join(ssh_dir, "authorized_keys"), "w", encoding="utf-8") as handle:
        handle.write("ssh-ed25519 AAAA break-glass\n")
    s3 = FakeS3()
    put(s3, {"alice": ed25519_line("a"), "bob": 'command="/bin/sh" ' + ed25519_line("b")})
    config = make_config(root, mode="shared_user", shared_user="ec2-user")
    result = run(config, s3)
    text = authorized_keys(root, "ec2-user")
    above, below = text.split(MARKER_LINE)
    assert above == "ssh-ed25519 AAAA break-glass\n"
    assert below.count("ssh-ed25519") == 1 and " a\n" in below
    assert any(r["user"] == "bob" for r in result["rejected"])
    assert not run(config, s3)["changed"]


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


def test_system_backend_uses_argument_lists():
    commands = []
    backend = SystemUserBackend(runner=commands.append)
    backend.create_user("alice", 23456, ["fleetkeeper-keys", "sudo"], "/bin/bash", "/home/alice")
    backend.lock_user("alice")
    backend.unlock_user("alice", "/bin/bash")
    backend.remove_user("alice")
    assert commands[0] == ["useradd", "--create-home", "--home-dir", "/home/alice", "--uid", "23456", "--user-group",
                           "--groups", "fleetkeeper-keys,sudo", "--shell", "/bin/bash", "--comment",
                           "managed by fleetkeeper.aws keysync", "--", "alice"]
    assert commands[1][:3] == ["usermod", "--expiredate", "1"] and commands[1][-2:] == ["--", "alice"]
    assert commands[2][:3] == ["usermod", "--expiredate", ""]
    assert commands[3] == ["userdel", "--remove", "--", "alice"]
    assert all(isinstance(c, list) for c in commands)


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
    s3.fail_list = RuntimeError("AccessDenied")
    err = io.StringIO()
    assert keysync_host.main(["--config", config_path], s3_factory=lambda c: s3, stdout=out, stderr=err) == 1
    assert "AccessDenied" in err.getvalue() and "nothing was changed" in err.getvalue()
    bad = write_config(tmp_path, root, mode="shared_user")
    assert keysync_host.main(["--config", bad], s3_factory=lambda c: s3, stdout=out, stderr=io.StringIO()) == 2
    s3.fail_list = None
    lock = os.path.join(root, "run", "fleetkeeper", "keysync.lock")
    with SyncLock(lock, 0):
        config_path = write_config(tmp_path, root, lock_timeout=0)
        assert keysync_host.main(["--config", config_path], s3_factory=lambda c: s3,
                                 stdout=out, stderr=io.StringIO()) == 75

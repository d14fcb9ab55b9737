# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Key sync runs with an in-memory S3 and the directory backend: files, symlinks, lock, fail-closed order, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest

from ansible_collections.fleetkeeper.aws.plugins.module_utils import keysync_host
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    MARKER_LINE,
    DownloadError,
    FailClosedError,
    KeySyncConfig,
    ListingError,
    LockError,
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
        self.cut_listing = False

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
            result["NextContinuationToken"] = str(start + len(page))
        return result

    def get_object(self, Bucket, Key, IfMatch=None):  # noqa: N803
        self.calls["get"] += 1
        if self.fail_get:
            raise self.fail_get
        return {"Body": io.BytesIO(self.objects[Key])}


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


@pytest.mark.parametrize("fault", ["list", "cut", "get"])
def test_s3_trouble_changes_nothing(root, fault):
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
        s3.fail_get = RuntimeError("connection reset")
        expected = DownloadError
    with pytest.raises(expected, match="nothing was changed"):
        run(config, s3)
    assert tree(root) == before


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


def test_a_malformed_file_keeps_the_previous_keys(root):
    s3 = FakeS3()
    good = ed25519_line("a")
    put(s3, {"alice": good, "bob": ed25519_line("b")})
    config = make_config(root)
    run(config, s3)
    put(s3, {"alice": "this is not a key\n"})
    result = run(config, s3)
    assert authorized_keys(root, "alice") == good + "\n"
    assert any(r["object"] == "keys/alice.pub" and "skipped" in r["reason"] for r in result["rejected"])


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
    lock = os.path.join(root, "run", "lock", "fleetkeeper-keysync.lock")
    with SyncLock(lock, 0):
        config_path = write_config(tmp_path, root, lock_timeout=0)
        assert keysync_host.main(["--config", config_path], s3_factory=lambda c: s3,
                                 stdout=out, stderr=io.StringIO()) == 75

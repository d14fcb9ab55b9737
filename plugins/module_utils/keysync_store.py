# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync, host side: user backends, safe atomic writes, state file and lock.

Two user backends implement the same small interface (``list_users``,
``ensure_group``, ``create_user``, ``add_groups``, ``lock_user``,
``unlock_user``, ``remove_user``):

* ``SystemUserBackend`` runs the distribution's ``groupadd``/``useradd``/
  ``usermod``/``userdel`` with argument lists (never a shell) and reads the
  account databases under /etc.
* ``DirectoryUserBackend`` keeps accounts in a JSON file under a root
  directory and writes every file below that root. It renders a key tree
  without touching the host's accounts (staging an image, a dry run on a
  workstation, the integration tests and benchmarks) and records every
  operation it was asked to do.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    ApplyError,
    ConfigError,
    LockError,
    UserBackendError,
    UserInfo,
)

NOLOGIN_CANDIDATES = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
ACCOUNT_COMMENT = "managed by fleetkeeper.aws keysync"


def rooted(root, path):
    """``path`` (absolute) below ``root``."""
    if root in ("", "/"):
        return path
    return os.path.join(root, path.lstrip("/"))


def nologin_shell():
    for candidate in NOLOGIN_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    return "/bin/false"


class SystemUserBackend:
    """The host's own accounts, changed with the distribution's tools."""

    root = "/"

    def __init__(self, runner=None):
        self.operations = []
        self._runner = runner or self._run

    @staticmethod
    def _run(argv):
        # Shared with the host-side entry point, which has no AnsibleModule (so no run_command).
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)  # pylint: disable=ansible-bad-function
        if proc.returncode != 0:
            raise UserBackendError("%s failed (exit %d): %s" % (
                " ".join(argv), proc.returncode, proc.stderr.decode("utf-8", "replace").strip()))

    def _do(self, argv):
        self.operations.append(list(argv))
        self._runner(argv)

    @staticmethod
    def _expired_users():
        expired = set()
        try:
            with open("/etc/shadow", "r", encoding="utf-8") as handle:
                for line in handle:
                    fields = line.rstrip("\n").split(":")
                    if len(fields) > 7 and fields[7] not in ("",) and fields[7].isdigit():
                        if int(fields[7]) * 86400 <= time.time():
                            expired.add(fields[0])
        except (IOError, OSError):
            pass
        return expired

    def list_users(self):
        members = {}
        for group in grp.getgrall():
            for member in group.gr_mem:
                members.setdefault(member, set()).add(group.gr_name)
        primary = dict((g.gr_gid, g.gr_name) for g in grp.getgrall())
        expired = self._expired_users()
        users = {}
        for entry in pwd.getpwall():
            groups = set(members.get(entry.pw_name, ()))
            if entry.pw_gid in primary:
                groups.add(primary[entry.pw_gid])
            users[entry.pw_name] = UserInfo(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir,
                                            entry.pw_shell, groups, entry.pw_name in expired)
        return users

    def group_exists(self, name):
        try:
            grp.getgrnam(name)
            return True
        except KeyError:
            return False

    def ensure_group(self, name):
        if self.group_exists(name):
            return False
        self._do(["groupadd", "--", name])
        return True

    def create_user(self, name, uid, groups, shell, home):
        self._do(["useradd", "--create-home", "--home-dir", home, "--uid", str(uid), "--user-group",
                  "--groups", ",".join(groups), "--shell", shell, "--comment", ACCOUNT_COMMENT, "--", name])

    def add_groups(self, name, groups):
        self._do(["usermod", "--append", "--groups", ",".join(groups), "--", name])

    def lock_user(self, name):
        self._do(["usermod", "--expiredate", "1", "--shell", nologin_shell(), "--", name])

    def unlock_user(self, name, shell):
        self._do(["usermod", "--expiredate", "", "--shell", shell, "--", name])

    def remove_user(self, name):
        self._do(["userdel", "--remove", "--", name])

    def flush(self):
        """Every change is already applied by the command that made it."""


class DirectoryUserBackend:
    """Accounts kept in ``ROOT/etc/fleetkeeper-users.json``; homes and keys written below ROOT."""

    DB = "etc/fleetkeeper-users.json"

    def __init__(self, root):
        if root in ("", "/"):
            raise ConfigError("user_backend directory needs root set to a directory other than /")
        self.root = root
        self.path = os.path.join(root, self.DB)
        self.operations = []
        self._db = None

    def _load(self):
        if self._db is None:
            try:
                with open(self.path, "r", encoding="utf-8") as handle:
                    self._db = json.load(handle)
            except IOError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                self._db = {}
            self._db.setdefault("users", {})
            self._db.setdefault("groups", [])
            self._db.setdefault("operations", [])
        return self._db

    def _save(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self._db, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, self.path)

    def _record(self, *operation):
        self.operations.append(list(operation))
        self._load()["operations"].append(list(operation))
        self._dirty = True

    def flush(self):
        """Write the account file once per run (the sync calls this after its last change)."""
        if getattr(self, "_dirty", False):
            self._save()
            self._dirty = False

    def list_users(self):
        users = {}
        for name, entry in self._load()["users"].items():
            users[name] = UserInfo(name, entry["uid"], entry.get("gid", entry["uid"]), entry["home"],
                                   entry.get("shell", "/bin/bash"), entry.get("groups", []),
                                   entry.get("locked", False))
        return users

    def group_exists(self, name):
        return name in self._load()["groups"]

    def ensure_group(self, name):
        if self.group_exists(name):
            return False
        self._load()["groups"].append(name)
        self._record("groupadd", name)
        return True

    def create_user(self, name, uid, groups, shell, home):
        db = self._load()
        db["users"][name] = {"uid": uid, "gid": uid, "home": home, "shell": shell,
                             "groups": sorted(set(groups) | {name}), "locked": False}
        self._record("useradd", name, uid, sorted(groups))
        path = rooted(self.root, home)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.isdir(path):
            os.mkdir(path, 0o700)
            if os.geteuid() == 0:
                os.lchown(path, uid, uid)

    def add_groups(self, name, groups):
        entry = self._load()["users"][name]
        entry["groups"] = sorted(set(entry["groups"]) | set(groups))
        self._record("usermod-groups", name, sorted(groups))

    def lock_user(self, name):
        self._load()["users"][name]["locked"] = True
        self._record("lock", name)

    def unlock_user(self, name, shell):
        entry = self._load()["users"][name]
        entry["locked"] = False
        entry["shell"] = shell
        self._record("unlock", name)

    def remove_user(self, name):
        entry = self._load()["users"].pop(name)
        self._record("userdel", name)
        home = rooted(self.root, entry["home"])
        if os.path.isdir(home) and not os.path.islink(home):
            shutil.rmtree(home)


def make_backend(config, runner=None):
    if config.user_backend == "directory":
        return DirectoryUserBackend(config.root)
    if config.root != "/":
        raise ConfigError("root %r needs user_backend directory; the system backend manages / only" % config.root)
    return SystemUserBackend(runner)


# --------------------------------------------------------------------------
# Safe file access: directory file descriptors, O_NOFOLLOW, temp file beside the target.

O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def open_dir(path, create_mode=None, owner=None):
    """Open a directory without following a symlink in its last component; create it if asked."""
    try:
        fd = os.open(path, O_DIR)
    except OSError as exc:
        if exc.errno == errno.ENOENT and create_mode is not None:
            os.mkdir(path, create_mode)
            fd = os.open(path, O_DIR)
        elif exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ApplyError("%s is a symlink or not a directory; refusing to write through it" % path)
        else:
            raise ApplyError("cannot open %s: %s" % (path, exc.strerror))
    if owner is not None:
        _fix_owner_mode(fd, owner, create_mode)
    return fd


def open_subdir(parent_fd, name, parent_path, create_mode, owner=None):
    path = os.path.join(parent_path, name)
    try:
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            os.mkdir(name, create_mode, dir_fd=parent_fd)
            fd = os.open(name, O_DIR, dir_fd=parent_fd)
        elif exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ApplyError("%s is a symlink or not a directory; refusing to write through it" % path)
        else:
            raise ApplyError("cannot open %s: %s" % (path, exc.strerror))
    _fix_owner_mode(fd, owner, create_mode)
    return fd


def _fix_owner_mode(fd, owner, mode):
    st = os.fstat(fd)
    if owner is not None and os.geteuid() == 0 and (st.st_uid, st.st_gid) != owner:
        os.fchown(fd, owner[0], owner[1])
    if mode is not None and stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)


def read_in_dir(dir_fd, name):
    """(text, uid, gid, mode) of a regular file, or None when missing; a symlink counts as missing."""
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            return None
        raise ApplyError("cannot read %s: %s" % (name, exc.strerror))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace"), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
    finally:
        os.close(fd)


def atomic_write_in_dir(dir_fd, name, text, owner, mode, sync_dir=True):
    """Write ``name`` in the directory ``dir_fd`` via a temp file beside it, fsync and rename.

    With ``sync_dir=False`` the caller fsyncs the directory later (once for many files).
    """
    tmp = ".%s.fk-%d" % (name, os.getpid())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except OSError:
        pass
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, owner[0], owner[1])
        os.fchmod(fd, mode)
        data = text.encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if sync_dir:
        os.fsync(dir_fd)


def restore_selinux_context(path):
    """Give a freshly renamed file the label policy wants, where SELinux is on."""
    if not os.path.exists("/sys/fs/selinux/enforce"):
        return False
    try:
        import selinux  # pylint: disable=import-outside-toplevel

        if selinux.is_selinux_enabled():
            selinux.restorecon(path)
            return True
    except ImportError:
        pass
    for candidate in ("/usr/sbin/restorecon", "/sbin/restorecon"):
        if os.path.exists(candidate):
            # Shared with the host-side entry point, which has no AnsibleModule (so no run_command).
            subprocess.run([candidate, "-F", path], check=False,  # pylint: disable=ansible-bad-function
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            return True
    return False


class KeyFileStore:
    """Where each user's authorized_keys lives, and how it is read and written."""

    def __init__(self, config):
        self.config = config
        self.root = config.root
        self._unsynced_dirs = set()

    def flush(self):
        """fsync every directory a file was renamed into (once each, not once per file)."""
        for path in sorted(self._unsynced_dirs):
            try:
                fd = open_dir(path)
            except ApplyError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced_dirs.clear()

    def target(self, info):
        """(directory path, file name, directory owner, directory mode, file owner, file mode)."""
        if self.config.authorized_keys_dir:
            directory = rooted(self.root, self.config.authorized_keys_dir)
            return directory, info.name, (0, 0), 0o755, (0, 0), 0o644
        home = rooted(self.root, info.home)
        return os.path.join(home, ".ssh"), "authorized_keys", (info.uid, info.gid), 0o700, (info.uid, info.gid), 0o600

    def _open_target_dir(self, info, create):
        directory, _name, dir_owner, dir_mode, _owner, _mode = self.target(info)
        if self.config.authorized_keys_dir:
            if not os.path.isdir(directory):
                if not create:
                    return None
                os.makedirs(directory, 0o755)
            return open_dir(directory, create_mode=None)
        home = rooted(self.root, info.home)
        try:
            home_fd = open_dir(home)
        except ApplyError:
            if not create or os.path.lexists(home):
                raise
            return None
        try:
            try:
                return os.open(".ssh", O_DIR, dir_fd=home_fd) if not create else open_subdir(
                    home_fd, ".ssh", home, dir_mode, dir_owner)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return None
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ApplyError("%s/.ssh is a symlink or not a directory; refusing to read through it" % home)
                raise
        finally:
            os.close(home_fd)

    def read(self, info):
        """Current text, or None when there is no file yet."""
        try:
            fd = self._open_target_dir(info, create=False)
        except ApplyError:
            return None
        if fd is None:
            return None
        try:
            found = read_in_dir(fd, self.target(info)[1])
        finally:
            os.close(fd)
        return None if found is None else found[0]

    def write(self, info, text):
        """Write when content, owner or mode differ; True when something changed."""
        _directory, name, _dir_owner, _dir_mode, owner, mode = self.target(info)
        fd = self._open_target_dir(info, create=True)
        try:
            found = read_in_dir(fd, name)
            if found is not None:
                current, uid, gid, current_mode = found
                same_owner = os.geteuid() != 0 or (uid, gid) == owner
                if current == text and same_owner and current_mode == mode:
                    return False
            atomic_write_in_dir(fd, name, text, owner, mode, sync_dir=False)
            self._unsynced_dirs.add(self.target(info)[0])
        finally:
            os.close(fd)
        restore_selinux_context(os.path.join(self.target(info)[0], name))
        return True

    def delete(self, info):
        if not self.config.authorized_keys_dir:
            return False
        directory, name = self.target(info)[:2]
        try:
            os.unlink(os.path.join(directory, name))
            return True
        except OSError:
            return False


# --------------------------------------------------------------------------
# State file and lock


def load_state(path):
    try:
        with open(path, "r", encoding="utf-8") as handle:
            state = json.load(handle)
    except (IOError, OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("version") == 1 else {}


def save_state(path, state):
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700)
    fd = open_dir(directory)
    try:
        atomic_write_in_dir(fd, os.path.basename(path), json.dumps(state, sort_keys=True), (0, 0), 0o600)
    finally:
        os.close(fd)


class SyncLock:
    """An exclusive flock; waits up to ``timeout`` seconds, then raises LockError."""

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        self.fd = None

    def __enter__(self):
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            os.makedirs(directory, 0o755)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except (IOError, OSError) as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise LockError("another key sync holds %s (waited %ds)" % (self.path, self.timeout))
                time.sleep(0.2)

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

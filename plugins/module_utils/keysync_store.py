# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync, host side: user backends, safe atomic writes, state file and lock.

Two user backends implement the same small interface (``list_users``,
``ensure_group``, ``create_user``, ``add_groups``, ``remove_groups``,
``lock_user``, ``unlock_user``, ``end_sessions``, ``remove_user``):

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
import signal
import stat
import subprocess
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    ApplyError,
    ConfigError,
    LockError,
    UnsafePathError,
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
    KILL_ROUNDS = 20

    def __init__(self, runner=None, system_uid_max=999):
        self.operations = []
        self._runner = runner or self._run
        self.system_uid_max = system_uid_max
        self._running = None

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
    def _locked_users():
        """Accounts whose shadow entry stops a key login: expired (``usermod --expiredate``), or a real password
        hash locked with ``!`` (a bare ``!``/``!!`` is only useradd's "no password", which key logins ignore)."""
        locked = set()
        try:
            with open("/etc/shadow", "r", encoding="utf-8") as handle:
                for line in handle:
                    fields = line.rstrip("\n").split(":")
                    if len(fields) > 1 and fields[1].startswith("!") and fields[1].lstrip("!").startswith("$"):
                        locked.add(fields[0])
                    if len(fields) > 7 and fields[7].isdigit() and int(fields[7]) * 86400 <= time.time():
                        locked.add(fields[0])
        except (IOError, OSError):
            pass
        return locked

    def list_users(self):
        members = {}
        for group in grp.getgrall():
            for member in group.gr_mem:
                members.setdefault(member, set()).add(group.gr_name)
        primary = dict((g.gr_gid, g.gr_name) for g in grp.getgrall())
        locked = self._locked_users()
        users = {}
        for entry in pwd.getpwall():
            groups = set(members.get(entry.pw_name, ()))
            if entry.pw_gid in primary:
                groups.add(primary[entry.pw_gid])
            no_login = os.path.basename(entry.pw_shell or "") in ("nologin", "false")
            users[entry.pw_name] = UserInfo(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir,
                                            entry.pw_shell, groups, entry.pw_name in locked or no_login)
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

    def remove_groups(self, name, groups):
        for group in groups:
            self._do(["gpasswd", "--delete", name, group])

    def lock_user(self, name):
        self._do(["usermod", "--expiredate", "1", "--shell", nologin_shell(), "--", name])

    def unlock_user(self, name, shell):
        self._do(["usermod", "--expiredate", "", "--shell", shell, "--", name])

    def remove_user(self, name):
        self._do(["userdel", "--remove", "--", name])

    # Ending a revoked user's sessions and processes.

    @staticmethod
    def running_uids():
        """Every real, effective or saved UID of a live process, from one scan of /proc."""
        uids = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/status" % entry, "r", encoding="utf-8", errors="replace") as handle:
                    for line in handle:
                        if line.startswith("Uid:"):
                            uids.update(int(u) for u in line.split()[1:4])
                            break
            except (IOError, OSError, ValueError):
                continue
        return uids

    @staticmethod
    def processes_of(uid):
        """PIDs of live processes whose real, effective or saved UID is ``uid`` (zombies are already dead)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/status" % entry, "r", encoding="utf-8", errors="replace") as handle:
                    status = dict(line.split(":", 1) for line in handle if ":" in line)
            except (IOError, OSError):
                continue  # gone meanwhile
            if status.get("State", "").strip().startswith("Z"):
                continue
            uids = status.get("Uid", "").split()
            if str(uid) in uids[:3]:
                pids.append(int(entry))
        return pids

    @staticmethod
    def logind_running():
        return os.path.isdir("/run/systemd/system") and shutil.which("loginctl") is not None

    @staticmethod
    def kill_all_as(uid, gid):
        """SIGKILL every process ``uid`` may signal, in one kill(-1) made as that user (a fork loop cannot outrun it).

        ``/bin/sh -c 'kill -s KILL -- -1'`` runs as the user's UID and GID with no other group, so it holds nothing
        of root's; Linux delivers kill(-1) to every process of that UID except the caller. subprocess drops the
        groups, GID and UID in C between fork and exec: no Python runs in the child, so the sync's worker threads
        cannot leave it waiting on a lock they held at the fork. The environment is empty and the working
        directory is /, so nothing of the user's is read on the way.
        """
        try:
            # run_command cannot drop to another UID and GID; this runs in the host-side tool too.
            subprocess.run(["/bin/sh", "-c", "kill -s KILL -- -1"], user=uid, group=gid, extra_groups=[], env={},  # pylint: disable=ansible-bad-function
                           cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           close_fds=True, check=False, timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass  # the caller checks what still runs and kills it by PID

    def end_sessions(self, name, uid, gid):
        """End the user's logind sessions, then kill whatever still runs under ``uid``. True when anything ran."""
        if uid <= self.system_uid_max or uid <= 0:
            raise UserBackendError("refusing to kill the processes of %s: UID %d is a system UID" % (name, uid))
        if self._running is None:
            self._running = self.running_uids()  # one /proc scan per run, however many users are revoked
        if uid not in self._running or not self.processes_of(uid):
            return False
        if self.logind_running():
            self.operations.append(["loginctl", "terminate-user", name])
            try:
                self._runner(["loginctl", "terminate-user", "--", name])
            except UserBackendError:
                pass  # no session known to logind: the kill below does the work
        for _round in range(self.KILL_ROUNDS):
            pids = self.processes_of(uid)
            if not pids:
                return True
            self.operations.append(["kill", "-KILL", "uid=%d" % uid])
            self.kill_all_as(uid, gid)
            for pid in self.processes_of(uid):  # real UID root, effective UID the user: kill(-1) as the user misses them
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)
        left = self.processes_of(uid)
        if left:
            raise UserBackendError("processes of %s (UID %d) survived %d rounds of SIGKILL: %s"
                                   % (name, uid, self.KILL_ROUNDS, " ".join(str(p) for p in left[:10])))
        return True

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

    def remove_groups(self, name, groups):
        entry = self._load()["users"][name]
        entry["groups"] = sorted(set(entry["groups"]) - set(groups))
        self._record("gpasswd-delete", name, sorted(groups))

    def lock_user(self, name):
        self._load()["users"][name]["locked"] = True
        self._record("lock", name)

    def end_sessions(self, name, uid, gid):
        """A key tree has no processes to end."""
        return False

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
    return SystemUserBackend(runner, config.system_uid_max)


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


O_READ = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
          | getattr(os, "O_NOCTTY", 0))


class UnsafeFileError(ApplyError):
    """A file that must not be read: not a plain file, hard-linked, someone else's, or too large."""


def _check_plain_file(st, path, owners, limit):
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFileError("%s is a symlink" % path)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        raise UnsafeFileError("%s is %s" % (path, kind))
    if st.st_nlink > 1:
        raise UnsafeFileError("%s has %d hard links (another name for it exists)" % (path, st.st_nlink))
    if owners is not None and st.st_uid not in owners:
        raise UnsafeFileError("%s is owned by UID %d, not by root or the user" % (path, st.st_uid))
    if limit is not None and st.st_size > limit:
        raise UnsafeFileError("%s is %d bytes, more than the %d a key file may hold" % (path, st.st_size, limit))


def read_in_dir(dir_fd, name, owners=None, limit=None, path=None):
    """(text, uid, gid, mode) of a plain file, or None when missing.

    The entry is checked with lstat before it is opened (so a device is never opened) and again with fstat on
    the descriptor opened with O_NOFOLLOW|O_NONBLOCK (so a FIFO swapped in meanwhile cannot block): a symlink,
    FIFO, socket, device, directory, a file with more than one hard link, one not owned by ``owners`` or larger
    than ``limit`` raises UnsafeFileError and is never read.
    """
    path = path or name
    try:
        _check_plain_file(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), path, owners, limit)
        fd = os.open(name, O_READ, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError("%s is a symlink" % path) from None
        raise ApplyError("cannot read %s: %s" % (path, exc.strerror)) from None
    try:
        st = os.fstat(fd)
        _check_plain_file(st, path, owners, limit)
        chunks = []
        remaining = (limit if limit is not None else st.st_size) + 1
        while remaining > 0:
            chunk = os.read(fd, min(65536, remaining))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if remaining <= 0 and limit is not None:
            raise UnsafeFileError("%s grew past %d bytes while it was read" % (path, limit))
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
    """Where each user's authorized_keys lives, and how it is read and written.

    Existing files and ``~/.ssh`` are distrusted: anything but a plain, singly linked file owned by root or
    the user, no larger than ``size_limit``, is never read. In per_user mode it is replaced (the new file is
    renamed over it); in shared_user mode the user is refused, since the lines above the marker would have to
    be copied from it.
    """

    def __init__(self, config, size_limit=None):
        self.config = config
        self.root = config.root
        self.shared = config.mode != "per_user"
        self.size_limit = size_limit
        self._unsynced_dirs = set()
        self.notes = []   # (user, what was found and replaced)

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

    def _owners(self, info):
        owners = {0, os.geteuid()}
        if not self.config.authorized_keys_dir:
            owners.add(info.uid)
        return owners

    def _open_ssh_dir(self, home_fd, home, info, create):
        """``~/.ssh`` as a descriptor; None when missing and not created. A non-directory is replaced or refused."""
        path = os.path.join(home, ".ssh")
        try:
            st = os.stat(".ssh", dir_fd=home_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise ApplyError("cannot inspect %s: %s" % (path, exc.strerror)) from None
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            if self.shared or not create:
                raise UnsafeFileError("%s is %s; refusing to read or write through it" % (path, what))
            os.unlink(".ssh", dir_fd=home_fd)  # removes the entry (a symlink's target is untouched)
            self.notes.append((info.name, "%s was %s; replaced by a directory" % (path, what)))
            st = None
        if st is None and not create:
            return None
        try:
            return open_subdir(home_fd, ".ssh", home, 0o700, (info.uid, info.gid)) if create else os.open(
                ".ssh", O_DIR, dir_fd=home_fd)
        except OSError as exc:
            raise ApplyError("cannot open %s: %s" % (path, exc.strerror)) from None

    def _open_target_dir(self, info, create):
        directory = self.target(info)[0]
        if self.config.authorized_keys_dir:
            if not os.path.isdir(directory):
                if not create:
                    return None
                os.makedirs(directory, 0o755, exist_ok=True)  # writers run in parallel
            return open_dir(directory, create_mode=None)
        home = rooted(self.root, info.home)
        try:
            home_fd = open_dir(home)
        except ApplyError:
            if not create or os.path.lexists(home):
                raise
            return None
        try:
            return self._open_ssh_dir(home_fd, home, info, create)
        finally:
            os.close(home_fd)

    def _read_fd(self, fd, info):
        directory, name = self.target(info)[:2]
        return read_in_dir(fd, name, self._owners(info), self.size_limit, os.path.join(directory, name))

    def read(self, info):
        """Current text, or None when there is no file yet or it must not be read (see ``check``)."""
        try:
            fd = self._open_target_dir(info, create=False)
        except ApplyError:
            return None
        if fd is None:
            return None
        try:
            found = self._read_fd(fd, info)
        except ApplyError:
            return None
        finally:
            os.close(fd)
        return None if found is None else found[0]

    def read_strict(self, info):
        """Like ``read`` but raise UnsafeFileError for a file that must not be read (shared_user mode)."""
        fd = self._open_target_dir(info, create=False)
        if fd is None:
            return None
        try:
            found = self._read_fd(fd, info)
        finally:
            os.close(fd)
        return None if found is None else found[0]

    def write(self, info, text):
        """Write when content, owner or mode differ; True when something changed."""
        directory, name, _dir_owner, _dir_mode, owner, mode = self.target(info)
        fd = self._open_target_dir(info, create=True)
        try:
            try:
                found = self._read_fd(fd, info)
            except UnsafeFileError as exc:
                if self.shared:
                    raise
                self.notes.append((info.name, "%s; replaced without reading it" % exc))
                found = None
            if found is not None:
                current, uid, gid, current_mode = found
                same_owner = os.geteuid() != 0 or (uid, gid) == owner
                if current == text and same_owner and current_mode == mode:
                    return False
            try:
                atomic_write_in_dir(fd, name, text, owner, mode, sync_dir=False)
            except OSError as exc:
                raise ApplyError("cannot write %s: %s" % (os.path.join(directory, name), exc.strerror)) from None
            self._unsynced_dirs.add(directory)
        finally:
            os.close(fd)
        restore_selinux_context(os.path.join(directory, name))
        return True

    def revoke(self, info):
        """Take every key away: delete a root-owned key file, empty ``~/.ssh/authorized_keys``. True when changed."""
        if self.config.authorized_keys_dir:
            directory, name = self.target(info)[:2]
            try:
                fd = open_dir(directory)
            except ApplyError:
                return False  # no key directory: no key file
            try:
                os.unlink(name, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return False
                raise ApplyError("cannot remove %s: %s" % (os.path.join(directory, name), exc.strerror)) from None
            finally:
                os.close(fd)
            return True
        try:
            return self.write(info, "")
        except ApplyError:
            if not os.path.lexists(rooted(self.root, info.home)):
                return False  # no home: no key file
            raise

    def delete(self, info):
        return self.revoke(info) if self.config.authorized_keys_dir else False


# --------------------------------------------------------------------------
# State file and lock


STATE_VERSION = 2


def open_private_dir(path, create=True):
    """A directory only this user (root) can write: created 0700 when missing, refused when it is a symlink,
    someone else's, or writable by group or others (world-writable /run/lock, a directory planted in /tmp)."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if create and not os.path.isdir(parent):
        os.makedirs(parent, 0o755)
    if create:
        try:
            os.mkdir(path, 0o700)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise UnsafePathError("cannot create %s: %s" % (path, exc.strerror)) from None
    try:
        fd = os.open(path, O_DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError("%s is a symlink or not a directory; refusing to keep the key sync's lock or "
                                  "state there (remove it: the sync creates it root-only)" % path) from None
        if exc.errno == errno.ENOENT and not create:
            return None
        raise UnsafePathError("cannot open %s: %s" % (path, exc.strerror)) from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise UnsafePathError("%s is owned by UID %d with mode %04o; the key sync's lock and state need a directory "
                              "only root can write (remove it, or point lock_path/state_path elsewhere)"
                              % (path, st.st_uid, stat.S_IMODE(st.st_mode)))
    return fd


def _open_private_file(dir_fd, name, path, flags, mode=0o600):
    try:
        fd = os.open(name, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0), mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError("%s is a symlink; refusing to use it (remove it)" % path) from None
        if exc.errno == errno.ENOENT:
            return None
        raise UnsafePathError("cannot open %s: %s" % (path, exc.strerror)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise UnsafePathError("%s is not a plain file owned by root with one link; refusing to use it (remove it)"
                              % path)
    return fd


def load_state(path):
    """The previous run's state; {} when there is none (or it is unreadable JSON). Unsafe paths raise."""
    fd = open_private_dir(os.path.dirname(path), create=False)
    if fd is None:
        return {}
    try:
        file_fd = _open_private_file(fd, os.path.basename(path), path, os.O_RDONLY)
    finally:
        os.close(fd)
    if file_fd is None:
        return {}
    with os.fdopen(file_fd, "rb") as handle:
        data = handle.read(64 * 1024 * 1024)
    try:
        state = json.loads(data.decode("utf-8"))
    except ValueError:
        return {}
    if not isinstance(state, dict) or state.get("version") not in (1, STATE_VERSION):
        return {}
    if state.get("version") == 1:
        # Before version 2 the sync recorded no locks or grants: the users it had locked are the missing ones.
        state["locks_made"] = sorted(state.get("missing", {}))
    return state


def save_state(path, state):
    fd = open_private_dir(os.path.dirname(path))
    try:
        atomic_write_in_dir(fd, os.path.basename(path), json.dumps(state, sort_keys=True), (0, 0), 0o600)
    finally:
        os.close(fd)


class SyncLock:
    """An exclusive flock in a root-only directory; waits up to ``timeout`` seconds, then raises LockError.

    The directory is created 0700 when missing; a lock path that is a symlink, or a directory or file that is
    not root's alone, raises UnsafePathError before anything is done.
    """

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        self.fd = None

    def __enter__(self):
        dir_fd = open_private_dir(os.path.dirname(self.path))
        try:
            self.fd = _open_private_file(dir_fd, os.path.basename(self.path), self.path, os.O_RDWR | os.O_CREAT)
        finally:
            os.close(dir_fd)
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
                    raise LockError("another key sync holds %s (waited %ds)" % (self.path, self.timeout)) from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

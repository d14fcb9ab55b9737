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

import datetime
import errno
import fcntl
import grp
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    ApplyError,
    ConfigError,
    LockError,
    UnsafePathError,
    SUDOERS_DROPIN,
    UserBackendError,
    UserInfo,
    render_sudoers,
)
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_procs import Reaper

NOLOGIN_CANDIDATES = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
ACCOUNT_COMMENT = "managed by fleetkeeper.aws keysync"
LINGER_DIR = "/var/lib/systemd/linger"
# Where a kept user's cron and at jobs go (root only), so an administrator can still read them.
QUARANTINE_DIR = "/var/lib/fleetkeeper-keysync/jobs"
CRON_SPOOLS = ("/var/spool/cron/crontabs", "/var/spool/cron")   # Debian, RHEL
AT_SPOOLS = ("/var/spool/cron/atjobs", "/var/spool/at")          # Debian, RHEL
VISUDO_CANDIDATES = ("/usr/sbin/visudo", "/sbin/visudo", "/usr/bin/visudo")
SUDOERS_MODE = 0o440
MAX_SUDOERS_BYTES = 16 * 1024 * 1024


def expiry_date(days):
    """A shadow expiry field (days since 1970-01-01, or empty) as usermod --expiredate takes it."""
    if days in (None, "") or not str(days).isdigit():
        return ""
    return (datetime.date(1970, 1, 1) + datetime.timedelta(days=int(days))).isoformat()


def subordinate_ranges(name, uid, kind="uid", etc="/etc"):
    """[(start, count)] of ``name``'s entries in /etc/subuid (or /etc/subgid with kind gid)."""
    ranges = []
    try:
        with open(os.path.join(etc, "sub%s" % kind), "r", encoding="utf-8") as handle:
            for line in handle:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[0] in (name, str(uid)) and fields[1].isdigit() and fields[2].isdigit():
                    ranges.append((int(fields[1]), int(fields[2])))
    except (IOError, OSError):
        pass
    return ranges


def quarantine_jobs(name, uid, cron_spools=CRON_SPOOLS, at_spools=AT_SPOOLS, quarantine=QUARANTINE_DIR):
    """Move ``name``'s crontab and at jobs into QUARANTINE_DIR/NAME (root only). Returns what was moved."""
    moved = []
    found = []
    for spool in cron_spools:
        path = os.path.join(spool, name)
        if os.path.isfile(path) and not os.path.islink(path):
            found.append((path, "crontab"))
    for spool in at_spools:
        try:
            entries = os.listdir(spool)
        except OSError:
            continue
        for entry in entries:
            path = os.path.join(spool, entry)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_uid == uid and not entry.startswith("."):
                found.append((path, "at job " + entry))
    if not found:
        return moved
    fd = open_private_dir(quarantine)
    os.close(fd)
    target = os.path.join(quarantine, name)
    os.makedirs(target, 0o700, exist_ok=True)
    for path, what in found:
        dest = os.path.join(target, "%s-%d" % (os.path.basename(path), int(time.time())))
        try:
            shutil.move(path, dest)
            moved.append(what)
        except (IOError, OSError):
            continue
    if moved:
        for spool in cron_spools:  # cron rereads its spool when the directory's mtime changes
            if os.path.isdir(spool):
                os.utime(spool)
    return moved


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

    def __init__(self, runner=None, system_uid_max=999, shell=None):
        self.operations = []
        self._runner = runner or self._run
        self.system_uid_max = system_uid_max
        # A no-login shell reads as locked, unless it is the shell synced users are given (a forwarding-only
        # bastion): then only the expiry the lock sets (or a locked password) counts.
        self.login_shell = os.path.basename(shell or "")
        self._reaper = None

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
    def _shadow():
        """{name: shadow fields} ({} when /etc/shadow cannot be read)."""
        entries = {}
        try:
            with open("/etc/shadow", "r", encoding="utf-8") as handle:
                for line in handle:
                    fields = line.rstrip("\n").split(":")
                    entries[fields[0]] = fields
        except (IOError, OSError):
            pass
        return entries

    @classmethod
    def _locked_users(cls):
        """Accounts whose shadow entry stops a key login: expired (``usermod --expiredate``), or a real password
        hash locked with ``!`` (a bare ``!``/``!!`` is only useradd's "no password", which key logins ignore)."""
        locked = set()
        for name, fields in cls._shadow().items():
            if len(fields) > 1 and fields[1].startswith("!") and fields[1].lstrip("!").startswith("$"):
                locked.add(name)
            if len(fields) > 7 and fields[7].isdigit() and int(fields[7]) * 86400 <= time.time():
                locked.add(name)
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
            shell = os.path.basename(entry.pw_shell or "")
            no_login = shell in ("nologin", "false") and shell != self.login_shell
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
        # No subordinate UID/GID ranges: processes under those IDs would be out of the revocation's reach.
        self._do(["useradd", "--create-home", "--home-dir", home, "--uid", str(uid), "--user-group",
                  "--groups", ",".join(groups), "--shell", shell, "--comment", ACCOUNT_COMMENT,
                  "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0", "--", name])

    def add_groups(self, name, groups):
        self._do(["usermod", "--append", "--groups", ",".join(groups), "--", name])

    def remove_groups(self, name, groups):
        for group in groups:
            self._do(["gpasswd", "--delete", name, group])

    def lock_user(self, name):
        """Expire the account and give it no shell; return what unlocking must restore ({expiry, shell})."""
        fields = self._shadow().get(name, [])
        try:
            shell = pwd.getpwnam(name).pw_shell
        except KeyError:
            shell = None
        saved = {"expiry": fields[7] if len(fields) > 7 else "", "shell": shell}
        self._do(["usermod", "--expiredate", "1", "--shell", nologin_shell(), "--", name])
        return saved

    def unlock_user(self, name, saved):
        """Give back the expiry date and shell the account had before the sync locked it."""
        self._do(["usermod", "--expiredate", expiry_date(saved.get("expiry")), "--shell", saved["shell"], "--", name])

    def remove_user(self, name):
        self._do(["userdel", "--remove", "--", name])

    # Ending a revoked user's sessions and processes, and what would start them again.

    def reaper(self):
        if self._reaper is None:
            self._reaper = Reaper(self._runner)
        return self._reaper

    def end_sessions(self, name, uid, gid, fresh=True):
        """End every session and process of ``uid``, however started. True when anything ran.

        ``fresh=False`` (a user revoked and locked in an earlier run) first looks for the user's slice and
        processes, and only reaps when it finds any.
        """
        if uid <= self.system_uid_max or uid <= 0:
            raise UserBackendError("refusing to kill the processes of %s: UID %d is a system UID" % (name, uid))
        reaper = self.reaper()
        ranges = subordinate_ranges(name, uid)
        if not fresh and not reaper.busy(uid, ranges):
            return False
        self.operations.append(["kill", "-KILL", "uid=%d" % uid])
        # No loginctl call: logind closes the sessions by itself once their scopes are empty, and a D-Bus call
        # could only add time to the bound.
        return reaper.end_user(uid, gid, ranges)

    def end_key_sessions(self, account, fingerprints):
        """End exactly the sshd sessions of ``account`` that authenticated with one of ``fingerprints``."""
        reaper = self.reaper()
        ended = []
        for pid, fingerprint in sorted(reaper.sessions_by_key(account).items()):
            if fingerprint in fingerprints:
                self.operations.append(["end-session", account, fingerprint, pid])
                reaper.end_session_of(pid)
                ended.append(pid)
        return ended

    def retire(self, name, uid, keep):
        """Stop what would run for a revoked user later: lingering, subordinate IDs, and with ``keep`` (the
        account stays usable) the user's cron and at jobs, moved into a root-only directory. Returns what it did."""
        done = []
        linger = os.path.join(LINGER_DIR, name)
        if os.path.lexists(linger):
            # logind reads this at boot; the running user manager is in the user's slice and ends with it.
            self.operations.append(["rm", linger])
            os.unlink(linger)
            done.append("lingering disabled")
        for kind, option in (("uid", "--del-subuids"), ("gid", "--del-subgids")):
            for start, count in subordinate_ranges(name, uid, kind):
                self._do(["usermod", option, "%d-%d" % (start, start + count - 1), "--", name])
                done.append("subordinate %sS %d-%d removed" % (kind.upper(), start, start + count - 1))
        if keep:
            moved = quarantine_jobs(name, uid)
            if moved:
                done.append("jobs moved to %s: %s" % (QUARANTINE_DIR, ", ".join(moved)))
        return done

    def write_sudoers(self, users):
        """The managed sudoers drop-in lists exactly ``users`` (checked with visudo, which must be installed)."""
        visudo = find_visudo()
        if users and visudo is None:
            _remove_sudoers(os.path.dirname(SUDOERS_DROPIN), os.path.basename(SUDOERS_DROPIN), self._note)
            raise ApplyError("visudo is not installed (is sudo?): %s get no sudo right" % ", ".join(sorted(users)))
        return install_sudoers("/", users, visudo, self._note)

    def _note(self, *operation):
        self.operations.append(list(operation))

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
        entry = self._load()["users"][name]
        saved = {"expiry": entry.get("expiry", ""), "shell": entry.get("shell", "/bin/bash")}
        entry["locked"] = True
        entry["expiry"] = "1"
        entry["shell"] = "/usr/sbin/nologin"
        self._record("lock", name)
        return saved

    def end_sessions(self, name, uid, gid, fresh=True):
        """A key tree has no processes to end."""
        return False

    def end_key_sessions(self, account, fingerprints):
        """A key tree has no sessions to end."""
        return []

    def retire(self, name, uid, keep):
        self._record("retire", name, bool(keep))
        return []

    def write_sudoers(self, users):
        """The drop-in below the root; checked with visudo when it is installed (else the skip is recorded)."""
        return install_sudoers(self.root, users, find_visudo(), self._record, create_dir=True)

    def unlock_user(self, name, saved):
        entry = self._load()["users"][name]
        entry["locked"] = False
        entry["expiry"] = saved.get("expiry") or ""
        entry["shell"] = saved["shell"]
        self._record("unlock", name)

    def remove_user(self, name):
        entry = self._load()["users"].pop(name)
        self._record("userdel", name)
        home = rooted(self.root, entry["home"])
        if os.path.isdir(home) and not os.path.islink(home):
            shutil.rmtree(home)


def find_visudo():
    for candidate in VISUDO_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    return None


def read_sudoers(root):
    """The managed drop-in's text, or None when there is none (anything but a plain root file reads as "")."""
    path = rooted(root, SUDOERS_DROPIN)
    try:
        fd = open_dir(os.path.dirname(path))
    except ApplyError:
        return None
    try:
        found = read_in_dir(fd, os.path.basename(path), {0, os.geteuid()}, MAX_SUDOERS_BYTES, path)
    except ApplyError:
        return ""  # there, but not a file the sync wrote: rewritten
    finally:
        os.close(fd)
    return None if found is None else found[0]


def _sudoers_check(visudo, directory, path, record):
    """The check a new drop-in (its temp name ``tmp`` in ``directory``) must pass before it is renamed over
    ``path``: ``visudo -cf``, or with ``visudo`` None a note in ``record`` that it was skipped."""

    def check(tmp):
        if visudo is None:
            record("visudo-skipped", path)
            return
        proc = subprocess.run([visudo, "-cf", os.path.join(directory, tmp)],  # pylint: disable=ansible-bad-function
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            raise ApplyError("visudo -cf refused the new %s (exit %d): %s" % (
                path, proc.returncode, (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()))

    return check


def install_sudoers(root, users, visudo, record, create_dir=False):
    """Make the managed drop-in list exactly ``users``; True when it changed.

    No user: the file is removed. Else it is written beside itself (a temp name with a dot, which sudo's
    ``@includedir`` never reads), checked with ``visudo -cf`` and renamed over the old one, root 0440. When the
    check fails the old file is removed too, so nobody keeps a sudo right the sync no longer grants, and
    ApplyError says why. ``visudo`` None skips the check (the directory backend where sudo is not installed;
    ``record`` notes it).
    """
    path = rooted(root, SUDOERS_DROPIN)
    directory, name = os.path.split(path)
    text = render_sudoers(users)
    current = read_sudoers(root)
    if text == "":
        if current is None:
            return False
        return _remove_sudoers(directory, name, record)
    if not os.path.isdir(directory):
        if not create_dir:
            raise ApplyError("%s does not exist: is sudo installed? %s get no sudo right"
                             % (directory, ", ".join(sorted(users))))
        os.makedirs(directory, 0o750)
    fd = open_dir(directory)
    try:
        st = None
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        if current == text and st is not None and stat.S_IMODE(st.st_mode) == SUDOERS_MODE:
            return False

        check = _sudoers_check(visudo, directory, path, record)
        try:
            atomic_write_in_dir(fd, name, text, (0, 0), SUDOERS_MODE, validate=check)
        except ApplyError:
            _remove_sudoers(directory, name, record)
            raise
        except OSError as exc:
            _remove_sudoers(directory, name, record)
            raise ApplyError("cannot write %s: %s; it was removed" % (path, exc.strerror)) from None
    finally:
        os.close(fd)
    record("sudoers", path, sorted(users))
    return True


def _remove_sudoers(directory, name, record):
    path = os.path.join(directory, name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ApplyError("cannot remove %s: %s" % (path, exc.strerror)) from None
    record("sudoers-removed", path)
    return True


def make_backend(config, runner=None):
    if config.user_backend == "directory":
        return DirectoryUserBackend(config.root)
    if config.root != "/":
        raise ConfigError("root %r needs user_backend directory; the system backend manages / only" % config.root)
    return SystemUserBackend(runner, config.system_uid_max, config.shell)


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


TEMP_ATTEMPTS = 5


def atomic_write_in_dir(dir_fd, name, text, owner, mode, sync_dir=True, validate=None):
    """Write ``name`` in the directory ``dir_fd`` via a temp file beside it, fsync and rename.

    With ``sync_dir=False`` the caller fsyncs the directory later (once for many files). The temp file's name
    is random and it is created with O_EXCL: nothing a user plants in a directory they can write (their
    ``~/.ssh``) can be written through or can block the write. ``validate(temp name)`` runs on the written
    temp file before the rename; when it raises, the temp file is removed and the target is left as it was.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for attempt in range(TEMP_ATTEMPTS):
        tmp = ".%s.%s.fk" % (name, secrets.token_hex(12))
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            break
        except FileExistsError:
            if attempt == TEMP_ATTEMPTS - 1:
                raise
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
        if validate is not None:
            validate(tmp)
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
    the user, no larger than ``size_limit``, is never read: it is replaced (the new file is renamed over it).
    Nothing of an existing file is ever copied into the new one, in either mode.
    """

    def __init__(self, config, size_limit=None):
        self.config = config
        self.root = config.root
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
            if not create:
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

    def write(self, info, text):
        """Write when content, owner or mode differ; True when something changed."""
        directory, name, _dir_owner, _dir_mode, owner, mode = self.target(info)
        fd = self._open_target_dir(info, create=True)
        try:
            try:
                found = self._read_fd(fd, info)
            except UnsafeFileError as exc:
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

    def clear(self, info):
        """Remove the key file without reading or rewriting it: what is left when it cannot be written.

        True when a file was removed. A directory in its place holds no keys for sshd and is left alone.
        Raises ApplyError when the file stays.
        """
        directory, name = self.target(info)[:2]
        path = os.path.join(directory, name)
        try:
            fd = self._open_target_dir(info, create=False)
        except ApplyError:
            if not os.path.lexists(directory):
                return False
            raise
        if fd is None:
            return False
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return False
            os.unlink(name, dir_fd=fd)
            return True
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise ApplyError("cannot remove %s: %s" % (path, exc.strerror)) from None
        finally:
            os.close(fd)


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


def _load_json(path):
    """A JSON object from a root-only file; None when there is none (or it is unreadable JSON). Unsafe paths raise."""
    fd = open_private_dir(os.path.dirname(path), create=False)
    if fd is None:
        return None
    try:
        file_fd = _open_private_file(fd, os.path.basename(path), path, os.O_RDONLY)
    finally:
        os.close(fd)
    if file_fd is None:
        return None
    with os.fdopen(file_fd, "rb") as handle:
        data = handle.read(64 * 1024 * 1024)
    try:
        found = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def load_state(path):
    """The previous run's state; {} when there is none (or it is unreadable JSON). Unsafe paths raise."""
    state = _load_json(path)
    if state is None or state.get("version") not in (1, STATE_VERSION):
        return {}
    if state.get("version") == 1:
        # Before version 2 the sync recorded no locks or grants: the users it had locked are the missing ones.
        state["locks_made"] = sorted(state.get("missing", {}))
    locks = state.get("locks_made", {})
    if isinstance(locks, list):
        # Locks recorded without what the account had before: unlocking restores no expiry and the configured shell.
        state["locks_made"] = dict((name, None) for name in locks)
    return state


def save_state(path, state):
    fd = open_private_dir(os.path.dirname(path))
    try:
        atomic_write_in_dir(fd, os.path.basename(path), json.dumps(state, sort_keys=True), (0, 0), 0o600)
    finally:
        os.close(fd)


# Each run's outcome and the time of the last good sync, beside the state (read by monitoring and check mode).
STATUS_FILE = "status.json"


def load_status(path):
    return _load_json(path) or {}


def save_status(path, status):
    save_state(path, status)


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

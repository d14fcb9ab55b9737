# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync user backends: SystemUserBackend, DirectoryUserBackend, the sudoers drop-in and make_backend.

Two user backends implement the same small interface (``list_users``,
``ensure_group``, ``create_user``, ``add_groups``, ``remove_groups``,
``lock_user``, ``unlock_user``, ``end_sessions``, ``remove_user``) and
describe accounts as ``UserInfo`` (keysync_plan):

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
import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import ApplyError, ConfigError, UserBackendError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_files import atomic_write_in_dir, open_dir, open_private_dir, read_in_dir, rooted
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import UserInfo
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_procs import Reaper
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_render import SUDOERS_DROPIN, render_sudoers


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

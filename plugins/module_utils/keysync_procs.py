# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync, host side: ending a revoked user's processes and sessions without trusting a listing.

A scan of /proc sees a moment, not a user: a chain of processes that each fork a successor and exit is never
all in one scan. So ``Reaper.end_user`` does not start from a listing:

1. **The user's cgroup.** On systemd hosts every login of the user (sshd, su, the user manager and its
   lingering services) lands in ``user.slice/user-UID.slice``. The whole slice is frozen (``cgroup.freeze``:
   nothing in it runs, so nothing forks or signals), then killed (``cgroup.kill``, Linux 5.14+; on older kernels
   every PID of the frozen, hence complete, subtree), and thawed once empty.
2. **kill(-1) as the user**, for what runs outside the slice (cron and at jobs, daemons started under the UID).
   The kernel signals every process the caller may signal in one pass, so a fork chain cannot outrun it. The
   helper that calls it runs with real and saved UID ``KILLER_UID`` and effective UID the user's: it may signal
   the user's processes (their real UID is the helper's effective one), but none of them may signal it back
   (their UIDs match neither its real nor its saved UID), so a user cannot stop or ptrace the helper. It calls
   kill(-1) ``HELPER_CALLS`` times and reports whether any call hit something (else ESRCH).
3. **Root's own pass** over /proc for processes whose real, effective or saved UID is the user's (or one of
   their subordinate IDs): a setuid program the user started keeps root's saved UID, which kill(-1) as the
   user may not reach.

Steps 2 and 3 repeat until ``QUIET_ROUNDS`` rounds in a row find no live process, at most ``MAX_ROUNDS``
times (kill(-1) also "hits" a zombie its parent has not reaped yet, so its answer alone cannot end the loop). The time one user can
add to a run is bounded by ``time_bound()`` (the slice wait, plus every round's helper timeout and pause).

Ending the sessions of one key (shared_user mode) reads which key each sshd session authenticated with from
sshd's ``LogLevel VERBOSE`` line in the journal (written by the root-owned sshd process, keyed by its PID) and
ends that session's scope the same way.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import UserBackendError

# The helper's real and saved UID: no account and no process has it ((uid_t)-2, never handed out).
KILLER_UID = 4294967294
HELPER_EXIT_KILLED = 0
HELPER_EXIT_NOTHING = 3
# Runs in a fresh interpreter (no Python state of the sync is shared with it): drop every group, then the UIDs.
HELPER_CODE = """
import os, sys, time
killer, uid, gid, calls = (int(a) for a in sys.argv[1:5])
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(killer, uid, killer)
hit = False
for call in range(calls):
    try:
        os.kill(-1, 9)
        hit = True
    except ProcessLookupError:
        pass
    time.sleep(0.001)
sys.exit(0 if hit else 3)
"""

# The processes that write sshd's "Accepted publickey" line (OpenSSH 9.8+: sshd-session; 10: sshd-auth too), and how far a
# session's start may follow its line (clock steps between the kernel's boot time and journald's wall clock).
SSHD_NAMES = ("sshd", "sshd-session", "sshd-auth")
PID_REUSE_SLACK = 2.0
_ACCEPTED = re.compile(r"^Accepted publickey for (?P<user>\S+) from \S+ port \d+ \S+: \S+ (?P<fp>SHA256:[A-Za-z0-9+/]+)")


def cgroup2_mount(mountinfo="/proc/self/mountinfo"):
    """Where the unified (cgroup2) hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts."""
    try:
        with open(mountinfo, "r", encoding="utf-8") as handle:
            for line in handle:
                fields = line.split()
                if "-" in fields:
                    sep = fields.index("-")
                    if len(fields) > sep + 1 and fields[sep + 1] == "cgroup2":
                        return fields[4]
    except (IOError, OSError):
        pass
    return None


def _write(path, text):
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _read(path):
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except (IOError, OSError):
        return None


def _events(path):
    text = _read(os.path.join(path, "cgroup.events")) or ""
    return dict(line.split(None, 1) for line in text.splitlines() if " " in line)


def _subtree(path):
    """``path`` and every cgroup below it."""
    found = []
    for current, dirs, _files in os.walk(path):
        found.append(current)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(current, d))]
    return found


def _kill_pid(pid):
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


class Reaper:
    """Ends every process of one UID. ``runner(argv)`` runs a command (raising on failure), as the backend does."""

    HELPER_CALLS = 3        # kill(-1) calls in one helper run
    QUIET_ROUNDS = 2        # rounds in a row (helper run + root's pass) that find no live process
    MAX_ROUNDS = 10
    HELPER_TIMEOUT = 5.0    # a helper cannot be stopped by the user; this only bounds a stuck fork or exec
    ROUND_PAUSE = 0.05
    SLICE_WAIT = 5.0        # for a killed cgroup to empty
    TIME_BOUND = 30.0       # the most one end_user() may take, slice included; then it reports what survived

    def __init__(self, runner=None, proc="/proc", cgroup_root=None, python=None, killer_uid=KILLER_UID,
                 log=None):
        self._runner = runner
        self.proc = proc
        self.cgroup_root = cgroup_root if cgroup_root is not None else cgroup2_mount()
        self.python = python or sys.executable
        self.killer_uid = killer_uid
        self.log = log or (lambda message: None)

    @classmethod
    def time_bound(cls):
        """The longest ``end_user`` takes, in seconds (documented in docs/bastion_keys.md): a round starts only
        while a whole helper timeout and one more second for root's pass still fit before it."""
        return cls.TIME_BOUND

    # -- process table, for root's own pass (never the only means) --

    def processes_of(self, uids):
        """PIDs of live processes whose real, effective or saved UID is in ``uids`` (a set or a range test)."""
        pids = []
        try:
            entries = os.listdir(self.proc)
        except OSError:
            return pids
        for entry in entries:
            if not entry.isdigit():
                continue
            status = _read(os.path.join(self.proc, entry, "status"))
            if not status:
                continue
            state = uid_line = None
            for line in status.splitlines():
                if line.startswith("State:"):
                    state = line.split()[1:2]
                elif line.startswith("Uid:"):
                    uid_line = line
                    break
            if state == ["Z"] or uid_line is None:
                continue
            try:
                ids = [int(u) for u in uid_line.split()[1:4]]
            except ValueError:
                continue
            if any(u in uids for u in ids):
                pids.append(int(entry))
        return pids

    # -- 1. the cgroup --

    def user_slice(self, uid):
        if not self.cgroup_root:
            return None
        path = os.path.join(self.cgroup_root, "user.slice", "user-%d.slice" % uid)
        return path if os.path.isdir(path) and not os.path.islink(path) else None

    def kill_cgroup(self, path):
        """Freeze ``path``, kill everything in it and below, thaw it once empty. True when anything was in it."""
        populated = _events(path).get("populated", "0").strip() == "1"
        freeze = os.path.join(path, "cgroup.freeze")
        frozen = False
        if os.path.exists(freeze):
            try:
                _write(freeze, "1")
                frozen = True
            except OSError:
                pass
        try:
            deadline = time.monotonic() + self.SLICE_WAIT
            while True:
                self._kill_cgroup_once(path)
                if _events(path).get("populated", "0").strip() != "1" or time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        finally:
            if frozen:
                try:
                    _write(freeze, "0")  # an empty slice left frozen would freeze the user's next login
                except OSError:
                    pass
        return populated

    @staticmethod
    def _kill_cgroup_once(path):
        try:
            _write(os.path.join(path, "cgroup.kill"), "1")
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL):
                raise
        # Before Linux 5.14: the subtree is frozen, so its PID lists are complete.
        for cgroup in _subtree(path):
            for pid in (_read(os.path.join(cgroup, "cgroup.procs")) or "").split():
                if pid.isdigit():
                    _kill_pid(int(pid))

    def busy(self, uid, extra_uids=()):
        """Whether anything of ``uid`` runs now (its slice is populated, or /proc shows a process): a quick look
        for users revoked in an earlier run, never the means of a revocation."""
        path = self.user_slice(uid)
        if path is not None and _events(path).get("populated", "0").strip() == "1":
            return True
        return bool(self.processes_of(_UidSet(uid, extra_uids)))

    # -- 2. kill(-1) as the user --

    def kill_as(self, uid, gid):
        """Run the helper once: True when a kill(-1) hit something, False when none did, None when it failed."""
        try:
            # run_command cannot change UIDs, and this runs in the host-side tool too (no AnsibleModule there).
            proc = subprocess.run(  # pylint: disable=ansible-bad-function
                [self.python, "-I", "-S", "-c", HELPER_CODE, str(self.killer_uid), str(uid), str(gid),
                 str(self.HELPER_CALLS)],
                env={}, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                close_fds=True, check=False, timeout=self.HELPER_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None  # subprocess has killed it (as root)
        except OSError:
            return None
        if proc.returncode == HELPER_EXIT_KILLED:
            return True
        if proc.returncode == HELPER_EXIT_NOTHING:
            return False
        return None

    # -- the whole of it --

    def end_user(self, uid, gid, extra_uids=()):
        """End every process of ``uid`` (and of ``extra_uids``, e.g. subordinate ranges). True when any ran.

        Raises UserBackendError when processes survive ``MAX_ROUNDS`` rounds.
        """
        deadline = time.monotonic() + self.TIME_BOUND
        found = False
        path = self.user_slice(uid)
        if path is not None:
            found = self.kill_cgroup(path) or found
        elif self._runner is not None and os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
            try:  # systemd without a unified hierarchy: let systemd kill its own slice
                self._runner(["systemctl", "kill", "--signal=KILL", "user-%d.slice" % uid])
            except UserBackendError:
                pass  # no such unit: nothing of the user ran under logind
        ids = _UidSet(uid, extra_uids)
        found = bool(self.processes_of(ids)) or found  # for the report only: the kill does not start from it
        quiet = 0
        rounds = 0
        strays = []
        while rounds < self.MAX_ROUNDS and time.monotonic() + self.HELPER_TIMEOUT + 1.0 < deadline:
            rounds += 1
            hit = self.kill_as(uid, gid)
            strays = self.processes_of(ids)
            for pid in strays:  # real UID root with the user's effective UID, or a subordinate ID
                _kill_pid(pid)
            found = found or bool(strays)
            quiet = quiet + 1 if hit is not None and not strays else 0
            if quiet >= self.QUIET_ROUNDS:
                return found
            time.sleep(self.ROUND_PAUSE)
        left = strays  # the last round's survivors: one more pass over /proc would run past TIME_BOUND
        raise UserBackendError("processes of UID %d survived %d rounds of SIGKILL%s" % (
            uid, rounds, (": " + " ".join(str(p) for p in left[:10])) if left else
            " (the kill helper did not complete a round)"))

    # -- sessions of one key (shared_user mode): found by SessionFinder, ended here --

    def _sessions(self):
        return SessionFinder(self.proc, self.cgroup_root)

    def sessions_by_key(self, account, journal=None):
        """{sshd PID: key fingerprint} for live sshd sessions of ``account``, from sshd's VERBOSE log in the journal."""
        return self._sessions().sessions_by_key(account, journal)

    def session_cgroup(self, pid):
        """The cgroup2 path of ``pid`` when it is a logind session scope, else None."""
        return self._sessions().session_cgroup(pid)

    def end_session_of(self, pid):
        """End the session the sshd process ``pid`` serves: its whole scope, or its process tree without logind."""
        scope = self.session_cgroup(pid)
        if scope is not None and os.path.isdir(scope):
            self.kill_cgroup(scope)
            return
        for child in [pid] + self._sessions().descendants(pid):
            _kill_pid(child)


class SessionFinder:
    """Which sshd session serves which key, and where a session's processes are: read from sshd's journal lines,
    /proc and the cgroup tree (never ends anything itself)."""

    def __init__(self, proc="/proc", cgroup_root=None):
        self.proc = proc
        self.cgroup_root = cgroup_root

    def sessions_by_key(self, account, journal=None):
        """{sshd PID: key fingerprint} for live sshd sessions of ``account``, from sshd's VERBOSE log in the journal.

        ``journal``: (PID, message[, wall-clock time of the line]) entries. A PID counts only while it is still
        the process that wrote the line: an sshd process (``sshd``, ``sshd-session``) started no later than the
        line. A PID the kernel handed to another process after the session ended is never taken for it."""
        lines = journal if journal is not None else self.journal_lines()
        found = {}
        for entry in lines:
            pid, message = entry[0], entry[1]
            match = _ACCEPTED.match(message)
            if not match or match.group("user") != account:
                continue
            if self._still_the_session(pid, entry[2] if len(entry) > 2 else None):
                found[pid] = match.group("fp")
        return found

    def _still_the_session(self, pid, logged_at):
        comm = (_read(os.path.join(self.proc, str(pid), "comm")) or "").strip()
        if comm not in SSHD_NAMES:
            return False  # gone, or the PID now belongs to another program
        started = self.start_time(pid)
        return logged_at is None or started is None or started <= logged_at + PID_REUSE_SLACK

    def start_time(self, pid):
        """When ``pid`` started (seconds since the epoch, from /proc/PID/stat and the boot time), or None."""
        fields = (_read(os.path.join(self.proc, str(pid), "stat")) or "").rsplit(")", 1)[-1].split()
        boot = [line.split()[1] for line in (_read(os.path.join(self.proc, "stat")) or "").splitlines()
                if line.startswith("btime ")]
        try:  # starttime is field 22 of stat, the 20th after the command name
            return int(boot[0]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        except (IndexError, ValueError, OSError):
            return None

    @staticmethod
    def journal_lines():
        journalctl = shutil.which("journalctl")
        if not journalctl:
            return []
        try:
            # Both names: OpenSSH 9.8+ logs authentication from sshd-session.
            proc = subprocess.run(  # pylint: disable=ansible-bad-function
                [journalctl, "--no-pager", "-b", "-o", "json", "--output-fields=MESSAGE,_PID",
                 "SYSLOG_IDENTIFIER=sshd", "SYSLOG_IDENTIFIER=sshd-session"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return []
        out = []
        for raw in proc.stdout.splitlines():
            try:
                entry = json.loads(raw)
                message = entry.get("MESSAGE")
                if isinstance(message, list):  # journald's form for a non-UTF-8 message
                    message = bytes(message).decode("utf-8", "replace")
                logged_at = int(entry["__REALTIME_TIMESTAMP"]) / 1e6 if entry.get("__REALTIME_TIMESTAMP") else None
                out.append((int(entry.get("_PID")), message or "", logged_at))
            except (ValueError, TypeError):
                continue
        return out

    def session_cgroup(self, pid):
        """The cgroup2 path of ``pid`` when it is a logind session scope, else None."""
        text = _read(os.path.join(self.proc, str(pid), "cgroup")) or ""
        for line in text.splitlines():
            if line.startswith("0::") and self.cgroup_root:
                relative = line[3:].strip()
                if re.search(r"/session-[^/]+\.scope$", relative):
                    return os.path.join(self.cgroup_root, relative.lstrip("/"))
        return None

    def descendants(self, pid):
        """Every process below ``pid`` in the process tree, from /proc/*/stat."""
        children = {}
        for entry in os.listdir(self.proc):
            if not entry.isdigit():
                continue
            stat = _read(os.path.join(self.proc, entry, "stat")) or ""
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 1 and fields[1].isdigit():
                children.setdefault(int(fields[1]), []).append(int(entry))
        out, todo = [], [pid]
        while todo:
            for child in children.get(todo.pop(), []):
                out.append(child)
                todo.append(child)
        return out


class _UidSet:
    """A UID plus subordinate ranges [(start, count)], tested with ``in``."""

    def __init__(self, uid, ranges=()):
        self.uid = uid
        self.ranges = [(int(s), int(c)) for s, c in ranges]

    def __contains__(self, value):
        return value == self.uid or any(s <= value < s + c for s, c in self.ranges)

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ending a revoked user's processes for real: UIDs no account on this machine has, real forks and signals.

Each hostile case is repeated, so an escape that happens one time in five is caught (0.8 ** 15 < 4 %), and
the time every case took is held against ``Reaper.time_bound()``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import select
import subprocess
import sys
import time

import pytest

from ansible_collections.fleetkeeper.aws.plugins.module_utils import keysync_procs
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import UserBackendError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_procs import (
    Reaper,
    cgroup2_mount,
)
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import SystemUserBackend

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run processes under other UIDs")

REPEATS = 15

# Each process forks its successor and exits: no scan ever sees the whole chain.
FORK_CHAIN = "import os\nos.write(1, b'x')\nwhile True:\n    if os.fork():\n        os._exit(0)\n"
# Stops every process it may signal, the kill helper included if it could, and keeps a fork chain going.
STOPPER = ("import os, signal\nos.write(1, b'x')\nif os.fork() == 0:\n"
           + "".join("    " + line + "\n" for line in FORK_CHAIN.splitlines()[2:])
           + "while True:\n    try:\n        os.kill(-1, signal.SIGSTOP)\n    except OSError:\n        pass\n")


# The users' own processes run the system's Python: the test's may sit where other UIDs cannot read (/root).
USER_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def unused_uid():
    while True:
        uid = random.randint(3000000, 3999999)
        if not Reaper(cgroup_root="").processes_of({uid}):
            return uid


# A root parent that is a child subreaper: it reaps every process of the chain that the kill leaves a zombie
# (an init that reaps nothing would otherwise collect them), optionally enters a cgroup first, then runs the
# user's code as the user. It stays root, so kill(-1) as the user does not reach it.
SUBREAPER = """
import ctypes, os, sys
uid, cgroup, code = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = os.fork()
if child == 0:
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as handle:
            handle.write(str(os.getpid()))
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    os.execv(sys.argv[4], [sys.argv[4], "-I", "-S", "-c", code])
os.close(1)  # only the user's processes hold the pipe: EOF on it means every one of them is gone
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def start(uid, code, cgroup=""):
    # pylint: disable-next=consider-using-with
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", SUBREAPER, str(uid), cgroup, code, USER_PYTHON],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _read_within(proc, seconds):
    ready, _w, _x = select.select([proc.stdout], [], [], seconds)
    return os.read(proc.stdout.fileno(), 64) if ready else None


def wait_running(proc):
    """Until the user's code has started (it writes one byte to the pipe the test holds)."""
    assert _read_within(proc, 10) == b"x", "the test's processes did not start"


def gone_within(proc, seconds=20.0):
    """Every process of the user's code has exited: each held the pipe's write end, so it reads EOF.

    Unlike a scan of /proc, this sees a fork chain's every member, however fast it moves. It is called once the
    kill is over, so EOF comes at once; ``seconds`` only bounds the wait for a survivor (a fork chain that
    escaped keeps the pipe open for ever), and is generous so that a loaded machine never fails a correct kill."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = _read_within(proc, max(0.0, deadline - time.monotonic()))
        if data == b"":
            return True
    return False


class Recording(Reaper):
    """The real reaper, remembering what each helper run reported (None: it timed out or failed)."""

    def __init__(self, **kwargs):
        super().__init__(cgroup_root="", **kwargs)
        self.helper_results = []

    def kill_as(self, uid, gid):
        result = super().kill_as(uid, gid)
        self.helper_results.append(result)
        return result


def reap(procs):
    """The subreapers exit once their children are gone; a test that failed kills them."""
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class FakeClock:
    """keysync_procs' ``time``: ``monotonic()`` moves only when the reaper sleeps or a stub says time passed."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("helper, scan", [
    (0.5, 0.05),
    (Reaper.HELPER_TIMEOUT, 0.4),  # every helper run times out: the fewest, longest rounds
    # slow passes over /proc: the report names the last round's survivors instead of making one more pass, which
    # could end up to ~0.55 s past the bound (30.55 s here)
    (4.8, 0.9),
], ids=["quick-helper", "helper-times-out", "slow-proc-pass"])
def test_the_stated_bound_is_30_seconds_and_holds_when_nothing_ever_dies(monkeypatch, helper, scan):
    """A process that never dies, on an injected clock: each helper run and each pass over /proc takes the time
    given, and the reaper gives up with the survivors' PIDs no later than its stated bound."""
    assert Reaper.time_bound() == 30
    clock = FakeClock()
    monkeypatch.setattr(keysync_procs, "time", clock)
    reaper = Reaper(cgroup_root="")
    monkeypatch.setattr(reaper, "MAX_ROUNDS", 1000)  # only the clock ends it
    helper_runs = []

    def kill_as(uid, gid):
        helper_runs.append(clock.now)
        clock.now += helper
        return True

    def processes_of(uids):
        clock.now += scan
        return [4242]

    monkeypatch.setattr(reaper, "kill_as", kill_as)
    monkeypatch.setattr(reaper, "processes_of", processes_of)
    monkeypatch.setattr(os, "kill", lambda pid, sig: None)
    started = clock.now
    with pytest.raises(UserBackendError, match=r"survived (\d+) rounds of SIGKILL: 4242") as caught:
        reaper.end_user(23456, 23456)
    rounds = int(re.search(r"survived (\d+) rounds", str(caught.value)).group(1))
    assert rounds == len(helper_runs) >= 4 and clock.sleeps == [Reaper.ROUND_PAUSE] * rounds
    # a round starts only while a whole helper timeout and root's pass still fit
    assert all(at + Reaper.HELPER_TIMEOUT + 1.0 < started + Reaper.time_bound() for at in helper_runs)
    assert clock.now - started <= Reaper.time_bound()


@pytest.mark.parametrize("case", ["fork-chain", "stopper"])
def test_a_fork_chain_and_a_user_who_stops_the_helper_are_gone_within_the_bound(case):
    elapsed = []
    for _attempt in range(REPEATS):
        uid = unused_uid()
        bystander = subprocess.Popen(["sleep", "30"], user=uid + 1, group=uid + 1, extra_groups=[])  # pylint: disable=consider-using-with
        reaper = Recording()
        procs = [start(uid, FORK_CHAIN if case == "fork-chain" else STOPPER)]
        try:
            wait_running(procs[0])
            started = time.monotonic()
            reaper.end_user(uid, uid)
            elapsed.append(time.monotonic() - started)
            assert gone_within(procs[0]), "a process of UID %d survived" % uid
            # On a loaded machine one helper run may time out (its interpreter starting during a fork storm); the
            # proof that the user cannot stop it is test_the_helper_cannot_be_signalled_by_the_user.
            assert True in reaper.helper_results, "no kill helper run completed"
            assert bystander.poll() is None  # another UID's process is untouched
        finally:
            bystander.kill()
            Reaper(cgroup_root="").end_user(uid, uid)
            reap(procs + [bystander])
    # Real processes on a real clock: this only says end_user() does not hang (the bound is generous, 30 s against
    # well under a second taken); that it keeps its bound is proved on an injected clock by
    # test_the_stated_bound_is_30_seconds_and_holds_when_nothing_ever_dies.
    assert max(elapsed) < Reaper.time_bound()


def test_a_process_started_while_another_user_is_revoked_is_ended_in_its_own_turn(monkeypatch):
    """One backend, two revocations in one run: the second user starts a process after the run began."""
    first, second = unused_uid(), unused_uid()
    backend = SystemUserBackend(runner=lambda argv: None)
    monkeypatch.setattr(backend, "reaper", lambda: Reaper(cgroup_root=""))
    procs = [start(first, FORK_CHAIN)]
    try:
        wait_running(procs[0])
        backend.end_sessions("first", first, first)
        procs.append(start(second, FORK_CHAIN))  # during the run, after it looked at the first user
        wait_running(procs[1])
        backend.end_sessions("second", second, second)
        assert gone_within(procs[0]) and gone_within(procs[1])
    finally:
        reap(procs)


def test_processes_under_a_subordinate_id_are_ended_too():
    """Outside a slice only root's pass reaches a subordinate ID (kill(-1) as the user does not): a respawning
    loop, not a fork chain. Synced accounts get no subordinate IDs, and lose any at revocation."""
    uid, sub = unused_uid(), unused_uid()
    procs = [start(sub, "import os, time\nos.write(1, b'x')\nwhile True:\n    if os.fork() == 0:\n"
                        "        time.sleep(30)\n    os.wait()\n")]
    try:
        wait_running(procs[0])
        Reaper(cgroup_root="").end_user(uid, uid, [(sub, 1)])
        assert gone_within(procs[0])
    finally:
        reap(procs)


def test_survivors_are_reported_with_their_pids(monkeypatch):
    reaper = Reaper(cgroup_root="")
    monkeypatch.setattr(reaper, "kill_as", lambda uid, gid: False)
    monkeypatch.setattr(reaper, "processes_of", lambda uids: [4242])
    monkeypatch.setattr(reaper, "MAX_ROUNDS", 2)
    monkeypatch.setattr(reaper, "ROUND_PAUSE", 0)
    monkeypatch.setattr(os, "kill", lambda pid, sig: None)
    with pytest.raises(UserBackendError, match="survived 2 rounds of SIGKILL: 4242"):
        reaper.end_user(23456, 23456)


def test_a_helper_that_never_reports_an_empty_round_is_a_failure(monkeypatch):
    reaper = Reaper(cgroup_root="")
    monkeypatch.setattr(reaper, "kill_as", lambda uid, gid: None)
    monkeypatch.setattr(reaper, "processes_of", lambda uids: [])
    monkeypatch.setattr(reaper, "MAX_ROUNDS", 2)
    monkeypatch.setattr(reaper, "ROUND_PAUSE", 0)
    with pytest.raises(UserBackendError, match="did not complete a round"):
        reaper.end_user(23456, 23456)


@pytest.fixture
def user_slice_root():
    """A private cgroup2 subtree shaped like systemd's (ROOT/user.slice/user-UID.slice), removed afterwards."""
    mount = cgroup2_mount()
    if not mount or not os.path.exists(os.path.join(mount, "cgroup.procs")):
        pytest.skip("no cgroup2 hierarchy")
    root = os.path.join(mount, "fleetkeeper-test-%d-%d" % (os.getpid(), random.randint(0, 1 << 30)))
    os.mkdir(root)
    try:
        yield root
    finally:
        for current, dirs, _files in sorted(os.walk(root), key=lambda item: -len(item[0])):
            for name in dirs:
                try:
                    os.rmdir(os.path.join(current, name))
                except OSError:
                    pass
        os.rmdir(root)


def test_the_user_slice_is_frozen_killed_and_thawed(user_slice_root):
    for _attempt in range(5):
        uid = unused_uid()
        slice_path = os.path.join(user_slice_root, "user.slice", "user-%d.slice" % uid, "session-1.scope")
        os.makedirs(slice_path)
        # Enter the session's cgroup as root, then become the user and fork away.
        proc = start(uid, FORK_CHAIN, cgroup=slice_path)
        reaper = Reaper(cgroup_root=user_slice_root)
        try:
            wait_running(proc)
            user_slice = reaper.user_slice(uid)
            assert user_slice == os.path.dirname(slice_path)
            assert reaper.kill_cgroup(user_slice) is True
            with open(os.path.join(user_slice, "cgroup.events"), encoding="ascii") as handle:
                events = handle.read()
            assert "populated 0" in events and "frozen 0" in events  # emptied, and not left frozen
            assert gone_within(proc)  # the cgroup alone ended the chain: nothing else kills it before the finally
        finally:
            Reaper(cgroup_root="").end_user(uid, uid)
            reap([proc])


def test_the_helper_cannot_be_signalled_by_the_user():
    """The helper's real and saved UID are not the user's: the user's kill(-1) does not reach it."""
    uid = unused_uid()
    # The user's process tries to stop everything it can for 3 s; the helper is started meanwhile.
    stopper = start(uid, "import os, signal, time\nos.write(1, b'x')\nend = time.time() + 3\nwhile time.time() < end:\n"
                         "    try:\n        os.kill(-1, signal.SIGSTOP)\n    except OSError:\n        pass\n")
    try:
        wait_running(stopper)
        # True is the helper's own exit status after its last kill(-1) hit: it ran to the end, so it was neither
        # stopped for good nor killed at HELPER_TIMEOUT (kill_as gives None for a helper that timed out).
        assert Reaper(cgroup_root="").kill_as(uid, uid) is True
        assert gone_within(stopper)
    finally:
        reap([stopper])


# --- sessions of one key, subordinate IDs, jobs left behind (no processes needed) ---------------------------------


def fake_process(proc, pid, comm, started_after_boot):
    """/proc/PID/comm and /proc/PID/stat (starttime, field 22, in clock ticks since boot) of a made-up process."""
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "comm").write_text(comm + "\n")
    ticks = int(started_after_boot * os.sysconf("SC_CLK_TCK"))
    rest = ["S", "1"] + ["0"] * 17 + [str(ticks)] + ["0"] * 30
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) " + " ".join(rest) + "\n")


def test_sessions_are_matched_to_keys_from_sshds_log_lines_of_live_processes(tmp_path):
    proc = tmp_path / "proc"
    boot = 1_700_000_000
    proc.mkdir()
    (proc / "stat").write_text(f"cpu  1 2 3\nbtime {boot}\nprocesses 9\n")
    fake_process(proc, 101, "sshd-session", 50)
    fake_process(proc, 202, "sshd", 60)
    fake_process(proc, 606, "bash", 70)           # the session ended, its PID went to another program
    fake_process(proc, 707, "sshd-session", 500)  # ... or to a later sshd session (started after the line)
    journal = [
        (101, "Accepted publickey for ec2-user from 10.0.0.5 port 50000 ssh2: ED25519 SHA256:AAAA+/key1", boot + 51),
        (202, "Accepted publickey for ec2-user from 10.0.0.6 port 50001 ssh2: RSA SHA256:BBBBkey2"),  # no time
        (303, "Accepted publickey for ec2-user from 10.0.0.7 port 50002 ssh2: ED25519 SHA256:CCCCgone"),  # exited
        (404, "Accepted publickey for alice from 10.0.0.8 port 50003 ssh2: ED25519 SHA256:AAAA+/key1"),  # other user
        (505, "Failed publickey for ec2-user from 10.0.0.9 port 50004 ssh2: ED25519 SHA256:DDDD"),
        (606, "Accepted publickey for ec2-user from 10.0.0.5 port 50005 ssh2: ED25519 SHA256:EEEEreused", boot + 71),
        (707, "Accepted publickey for ec2-user from 10.0.0.5 port 50006 ssh2: ED25519 SHA256:FFFFreused", boot + 80),
    ]
    reaper = Reaper(proc=str(proc), cgroup_root="")
    assert reaper.sessions_by_key("ec2-user", journal) == {101: "SHA256:AAAA+/key1", 202: "SHA256:BBBBkey2"}
    assert reaper.sessions_by_key("ec2-user", [journal[-1][:2] + (boot + 499,)]) == {707: "SHA256:FFFFreused"}


def test_the_journal_is_read_with_each_lines_time(monkeypatch):
    """journalctl's JSON always carries __REALTIME_TIMESTAMP (microseconds): it becomes the line's wall-clock time."""
    lines = [{"MESSAGE": "Accepted publickey for a from 10.0.0.1 port 1 ssh2: ED25519 SHA256:x", "_PID": "42",
              "__REALTIME_TIMESTAMP": "1700000051500000"},
             {"MESSAGE": [65, 66], "_PID": "43"}]
    monkeypatch.setattr(keysync_procs.shutil, "which", lambda name: "/bin/journalctl")
    monkeypatch.setattr(keysync_procs.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a[0], 0, stdout="\n".join(json.dumps(line) for line in lines).encode()))
    assert keysync_procs.SessionFinder.journal_lines() == [
        (42, lines[0]["MESSAGE"], 1700000051.5), (43, "AB", None)]


def test_end_key_sessions_ends_only_the_sessions_of_removed_keys(monkeypatch):
    ended = []
    backend = SystemUserBackend(runner=lambda argv: None)
    reaper = Reaper(cgroup_root="")
    monkeypatch.setattr(reaper, "sessions_by_key", lambda account: {101: "SHA256:keep", 202: "SHA256:gone"})
    monkeypatch.setattr(reaper, "end_session_of", ended.append)
    monkeypatch.setattr(backend, "reaper", lambda: reaper)
    assert backend.end_key_sessions("ec2-user", {"SHA256:gone"}) == [202] and ended == [202]


def test_subordinate_ranges_are_read_by_name_or_uid(tmp_path):
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import subordinate_ranges
    (tmp_path / "subuid").write_text("alice:100000:65536\n23456:300000:10\nbob:200000:65536\nbad line\n")
    assert subordinate_ranges("alice", 23456, etc=str(tmp_path)) == [(100000, 65536), (300000, 10)]
    assert subordinate_ranges("carol", 1, kind="gid", etc=str(tmp_path)) == []


def test_a_kept_users_cron_and_at_jobs_are_moved_aside_root_only(tmp_path):
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import quarantine_jobs
    cron, at, quarantine = tmp_path / "crontabs", tmp_path / "atjobs", tmp_path / "jobs"
    cron.mkdir()
    at.mkdir()
    (cron / "bob").write_text("* * * * * /home/bob/backdoor\n")
    (cron / "alice").write_text("* * * * * true\n")
    job = at / "a0001201a2b3c4"
    job.write_text("#!/bin/sh\n/home/bob/backdoor\n")
    os.chown(str(job), 3456789, 3456789)
    moved = quarantine_jobs("bob", 3456789, cron_spools=(str(cron),), at_spools=(str(at),),
                            quarantine=str(quarantine))
    assert sorted(moved) == ["at job a0001201a2b3c4", "crontab"]
    assert not (cron / "bob").exists() and not job.exists() and (cron / "alice").exists()
    assert oct(os.stat(str(quarantine)).st_mode & 0o777) == "0o700"
    assert len(os.listdir(str(quarantine / "bob"))) == 2

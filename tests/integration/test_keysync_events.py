# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Revocation in seconds, the whole loop for real (lab/keyevents.py, shared with the benchmark).

Three Debian 12 test hosts run the bastion_keys role against moto S3 behind the project's endpoint; the bucket
notifies moto SQS (set up by fleetkeeper.aws.s3_key_notifications); ansible-rulebook 1.3.2 runs the rulebook
fleetkeeper.aws.keysync; an inventory host that is down sits in the same group. A user logged in on every host
(login shell on a pty, a detached loop beside it) is revoked by one DeleteObject: every session ends, nothing of
the user runs and the key is refused, long before the 15-minute timer, and the host that is down holds up no
other. Then two deletions in one burst make one playbook run.
"""

from __future__ import annotations

import time

import pytest

from lab.keyevents import BUCKET, PREFIX, KeyEventsLab, requirements_missing

MISSING = requirements_missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

# Not the benchmark's 30 s target (that is measured, docs/performance.md): a bound far below the timer's
# 15 minutes that a loaded 2-core machine still meets, so that the test proves the event path, not a speed.
EVENT_PATH_BOUND_S = 120


def test_a_deleted_key_ends_the_users_sessions_on_every_host_at_once(tmp_path):
    # Eight users, so that removing three keeps the listing above the sync's min_listing_ratio (0.5).
    users = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
    with KeyEventsLab(str(tmp_path), hosts=3, users=users) as lab:
        for host in lab.host_names:
            assert not lab.key_refused(host, "alice") and lab.timer_active(host)

        results = lab.revoke("alice", timeout=EVENT_PATH_BOUND_S)
        print(results)
        log = lab.rulebook_text()
        assert sorted(results) == lab.host_names, results
        for host, figures in results.items():
            assert "error" not in figures, (host, figures, log[-4000:])
            assert figures["revoked_s"] <= EVENT_PATH_BOUND_S
            assert lab.user_processes(host, "alice") == 0
            assert lab.key_refused(host, "alice")
            assert not lab.key_refused(host, "bob"), "only alice is revoked"
            assert lab.timer_active(host), "the timer stays as the safety net"
            journal = lab.journal(host)
            assert "locked: alice" in journal and "sessions ended: alice" in journal, journal[-2000:]
        # The host that is down was tried, failed on its own, and delayed nobody.
        assert "down" in log and "unreachable=1" in log, log[-4000:]
        assert "deleted test event" in log and "Traceback" not in log
        assert "[WARNING]" not in log and "[DEPRECATION WARNING]" not in log, log[-4000:]

        # Two deletions within the coalescing window: one event, one sync run per host.
        for host in lab.host_names:
            lab.hold_timer(host, True)  # only event-driven runs are counted (the timer's randomized run could land here)
        runs = {host: lab.sync_runs(host) for host in lab.host_names}
        events = log.count("-> one event")
        s3 = lab.aws.client("s3")
        s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}bob.pub")
        s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}carol.pub")
        lab.wait_for_log("-> one event", 60, count=events + 1)
        deadline = time.monotonic() + EVENT_PATH_BOUND_S
        while not all(lab.key_refused(host, "bob") and lab.key_refused(host, "carol") for host in lab.host_names):
            assert time.monotonic() < deadline, lab.rulebook_text()[-4000:]
            time.sleep(1)
        time.sleep(lab.coalesce + 8)  # a second run, if there were one, would have started by now
        log = lab.rulebook_text()
        assert log.count("-> one event") == events + 1, log[-4000:]
        assert "2 record(s) from 2 message(s) -> one event (keys/bob.pub, keys/carol.pub)" in log, log[-4000:]
        for host in lab.host_names:
            assert lab.sync_runs(host) == runs[host] + 1, lab.journal(host)[-2000:]
            assert not lab.key_refused(host, "dave")
            lab.hold_timer(host, False)
            assert lab.timer_active(host)

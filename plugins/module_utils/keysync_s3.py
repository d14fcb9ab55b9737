# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync, one run: list S3, download what changed, plan, apply, keep state.

``sync()`` is the single implementation behind both entry points (the module
and ``keysync_host``). Its order is what makes it safe: every S3 call happens
before anything on disk changes, so a failed or cut-short listing or a
suspicious listing raises before the first write. A download that fails
affects only its user. Then every revocation is applied before any grant, each
user's account commands on their own: a failure is recorded and reported, and
the run goes on.

The S3 client is any boto3-compatible client, used only through
``keysync_bucket`` (listing, downloads, the team manifest's GET, request
counting and error text); ``call_kwargs`` is added to every call (the module
passes ``aws_retry=True`` for amazon.aws's retry wrapper; the host tool relies
on botocore's standard retry mode). Every S3 request goes through
``keysync_bucket._s3_request``, the one place that turns whatever a request
raised into an error of the sync.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    MAX_TEAMS_MANIFEST_BYTES,
    PER_USER,
    DEFAULT_DENY_USERS,
    TEAMS_MANIFEST,
    KeyLineError,
    KeySyncError,
    LockError,
    TeamsError,
    UnsafePathError,
    UserBackendError,
    check_listing_size,
    decode_object,
    fingerprints,
    key_lines,
    key_summary,
    parse_key_file,
    parse_key_line,
    parse_teams_manifest,
    plan_per_user,
    plan_shared_user,
    render_shared,
    render_sudoers,
    render_user,
    username_from_key,
    validate_username,
)
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import (
    STATE_VERSION,
    STATUS_FILE,
    KeyFileStore,
    SyncLock,
    load_state,
    load_status,
    read_sudoers,
    rooted,
    save_state,
    save_status,
)
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_bucket import RequestCounter
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_bucket import download_objects
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_bucket import download_teams_manifest
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_bucket import list_key_objects
# Moved to keysync_bucket (issue 22); still importable from here.
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_bucket import PAGE_SIZE  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_bucket import S3RequestError  # noqa: F401 pylint: disable=unused-import

# The ``user`` of a failure that concerns no one user (the managed sudoers drop-in).
SUDOERS_SUBJECT = "(sudoers)"


def _reject(rejected, obj, user, line, reason):
    rejected.append({"object": obj, "user": user, "line": line, "reason": reason})


def collect(s3, config, state, counter, call_kwargs=None):
    """List, download what changed, parse.

    Returns (desired {user: [PublicKey]}, new object state, rejected, stats, failed {user: reason}, listed names,
    the team manifest's (etag, size) from the listing or None).
    ``desired`` holds only users whose current object has at least one valid key: an object without one counts
    as gone. ``failed`` holds users whose changed object could not be downloaded: they keep nothing newer than
    what was verified (their old entry stays in the state, so the next run tries again).
    """
    listing = list_key_objects(s3, config.bucket, config.prefix, counter, call_kwargs, config.max_keys)
    same_source = state.get("bucket") == config.bucket and state.get("prefix") == config.prefix
    old_objects = state.get("objects", {}) if same_source else {}
    rejected = []
    teams_key = config.prefix + TEAMS_MANIFEST
    teams_object = listing.get(teams_key)
    candidates = _candidates(listing, config, teams_key, rejected)
    to_fetch = _changed_objects(candidates, old_objects)
    bodies, errors = download_objects(s3, config.bucket, to_fetch, counter, config.download_workers, call_kwargs)
    desired, new_objects, failed = _read_objects(candidates, old_objects, bodies, errors, config, rejected)
    stats = {"listed": len(listing), "candidates": len(candidates), "downloaded": len(bodies),
             "reused": len(candidates) - len(bodies) - len(errors), "failed": len(errors)}
    listed = sorted(set(name for name, _etag, _size in candidates.values()))
    return desired, new_objects, rejected, stats, failed, listed, teams_object


def _candidates(listing, config, teams_key, rejected):
    """{key: (name, etag, size)} for the listed key objects worth reading; every other object is added to
    ``rejected`` with the reason (or ignored silently)."""
    candidates = {}
    for key in sorted(listing):
        etag, size = listing[key]
        if key == teams_key:
            continue  # the team manifest: read by load_teams when the host's configuration lists teams
        name, reason = username_from_key(key, config.prefix)
        if name is None:
            if reason:
                _reject(rejected, key, None, None, reason)
            continue
        reason = validate_username(name, config)
        if reason:
            _reject(rejected, key, name, None, reason)
            continue
        if size > config.max_object_size:
            _reject(rejected, key, name, None, "object is %d bytes, more than max_object_size %d; not downloaded; "
                    "the user has no keys until it is fixed" % (size, config.max_object_size))
            continue
        if size == 0:
            _reject(rejected, key, name, None, "object is empty; the user has no keys until it holds a valid key")
            continue
        candidates[key] = (name, etag, size)
    return candidates


def _changed_objects(candidates, old_objects):
    """{key: (etag, size)} of the candidates to download: those whose ETag or Size differ from the state's (or
    that have no ETag)."""
    to_fetch = {}
    for key, (_name, etag, size) in candidates.items():
        old = old_objects.get(key)
        if not (old and old.get("etag") == etag and old.get("size") == size and etag):
            to_fetch[key] = (etag, size)
    return to_fetch


def _read_objects(candidates, old_objects, bodies, errors, config, rejected):
    """(desired {user: [PublicKey]}, new object state, failed {user: reason}) from the downloaded ``bodies``, and
    the state's entry for objects that did not change; refused lines and keys are added to ``rejected``."""
    desired = {}
    new_objects = {}
    failed = {}
    for key, (name, etag, size) in sorted(candidates.items()):
        if key in errors:
            failed[name] = errors[key]
            if key in old_objects:
                new_objects[key] = old_objects[key]  # its ETag differs from the listing's: fetched again next run
            continue
        old = old_objects.get(key) or {}
        entry = _object_entry(bodies[key], etag, size, name, config) if key in bodies else old
        for number, reason in entry.get("rejected", []):
            _reject(rejected, key, name, number, reason)
        new_objects[key] = entry
        parsed = _entry_keys(entry, key, name, config, rejected)
        if parsed:
            desired[name] = parsed
        else:
            refused = ", ".join("line %s" % n if n else "the file" for n, _r in entry.get("rejected", []))
            _reject(rejected, key, name, None, "no valid key in the object (refused: %s); the user's access is "
                    "revoked as if the object were deleted" % (refused or "nothing but comments"))
    return desired, new_objects, failed


def _object_entry(body, etag, size, name, config):
    """The state entry of a downloaded object: its key lines and the lines refused, with the reason."""
    try:
        text = decode_object(body)
        keys, bad_lines = parse_key_file(text, config.allowed_options, config.max_keys_per_user)
    except KeyLineError as exc:
        keys, bad_lines = [], [(None, str(exc))]
    return {"etag": etag, "size": size, "user": name,
            "keys": [k.line() for k in keys],
            "rejected": [[n, r] for n, r in bad_lines]}


def _entry_keys(entry, key, name, config, rejected):
    """The entry's key lines parsed under the current policy; a line it refuses is added to ``rejected``."""
    parsed = []
    for line in entry.get("keys", []):
        try:
            parsed.append(parse_key_line(line, config.allowed_options))
        except KeyLineError as exc:  # the policy changed since the state was written
            _reject(rejected, key, name, None, "stored key refused by the current policy: %s" % exc)
    return parsed


def load_teams(s3, config, state, teams_object, listed, counter, call_kwargs=None):
    """The team manifest as (membership {team: [user]}, state entry, warnings); raise TeamsError on any doubt.

    Downloaded only when its ETag or Size differs from the state's (an unchanged bucket costs no GET), with
    ``If-Match`` and the listed Size like a key object. Missing, too large, unreadable or invalid while
    ``teams`` is configured fails the whole run closed, like a failed listing: nothing changes (no grant and
    no revocation) until it is fixed, and the host turns stale. Members without a key object are warnings.
    """
    where = "s3://%s/%s%s" % (config.bucket, config.prefix, TEAMS_MANIFEST)
    if teams_object is None:
        raise TeamsError("teams is configured but %s does not exist; upload the team manifest ({team: [user]}); "
                         "nothing was changed" % where)
    etag, size = teams_object
    if size > MAX_TEAMS_MANIFEST_BYTES:
        raise TeamsError("%s is %d bytes, more than %d; nothing was changed" % (where, size, MAX_TEAMS_MANIFEST_BYTES))
    same_source = state.get("bucket") == config.bucket and state.get("prefix") == config.prefix
    old = state.get("teams_manifest") if same_source else None
    if isinstance(old, dict) and etag and old.get("etag") == etag and old.get("size") == size:
        data = json.dumps(old.get("teams")).encode("utf-8")
    else:
        data = download_teams_manifest(s3, config.bucket, config.prefix + TEAMS_MANIFEST, etag, size, counter,
                                       call_kwargs)
    try:
        membership = parse_teams_manifest(data, config)
    except TeamsError as exc:
        raise TeamsError("%s; nothing was changed" % exc) from None
    known = set(listed)
    warnings = []
    for team in sorted(membership):
        for member in membership[team]:
            if member not in known:
                warnings.append({"object": config.prefix + TEAMS_MANIFEST, "user": member, "line": None,
                                 "reason": "team %s lists %s, who has no accepted key object; ignored" % (team, member)})
    return membership, {"etag": etag, "size": size, "teams": membership}, warnings


def _current_lines(text, shared, static_lines):
    """The key lines the host has now that the sync accounts for: in shared_user mode every key line of the
    file except the static ones (so a key added by hand shows as removed), else every key line."""
    lines = key_lines(text)
    if shared:
        static = set(static_lines)
        lines = [line for line in lines if line not in static]
    return lines


def _describe(keys_by_user):
    out = []
    for user in sorted(keys_by_user):
        summary = key_summary(keys_by_user[user])
        if not summary:
            out.append("%s: (no keys)" % user)
        for item in summary:
            out.append("%s: %s" % (user, item))
    return "\n".join(out) + ("\n" if out else "")


def status_path_for(state_path):
    return os.path.join(os.path.dirname(state_path), STATUS_FILE)


def staleness(status, config, now=None):
    """{last_success, age, stale} from the status file: age counts from the last good sync, or from the first
    recorded run when there never was one (None when no run was ever recorded)."""
    now = time.time() if now is None else now
    last = status.get("last_success")
    since = last if last is not None else status.get("first_run")
    age = None if since is None else max(0, int(now - since))
    return {"last_success": _iso(last), "age": age, "stale": age is not None and age > config.max_sync_age,
            "max_sync_age": config.max_sync_age}


def _iso(stamp):
    if stamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def sync(config, s3, backend, check_mode=False, call_kwargs=None, log=None, now=None):
    """One run. Returns a result dict; raises a KeySyncError subclass when nothing was changed.

    A result with ``failed`` entries means the run went on past per-user failures: the entry points report
    each one and exit non-zero. Every run under the lock records its outcome in the status file; a failed run
    whose host has had no good sync for ``max_sync_age`` carries ``stale`` on its exception (and with
    ``stale_action: lock`` has locked every synced user).
    """
    log = log or (lambda message: None)
    state_path = rooted(config.root, config.state_path)
    lock_path = rooted(config.root, config.lock_path)
    status_path = status_path_for(state_path)
    if check_mode:
        result = _sync_locked(config, s3, backend, True, call_kwargs, log, state_path)
        result.update(staleness(load_status(status_path), config, now))
        return result
    with SyncLock(lock_path, config.lock_timeout):
        status = load_status(status_path)
        started = time.time() if now is None else now
        status.setdefault("first_run", started)
        status["last_run"] = started
        try:
            result = _sync_locked(config, s3, backend, False, call_kwargs, log, state_path)
        except (UnsafePathError, LockError):
            raise
        except KeySyncError as exc:
            status["last_outcome"] = "failed"
            status["last_error"] = str(exc)
            save_status(status_path, status)
            stale = staleness(status, config, now)
            if stale["stale"]:
                if config.stale_action == "lock":
                    stale["locked"] = _lock_everyone(config, backend, state_path, log)
                exc.stale = stale
            raise
        failed_revocations = [f for f in result["failures"] if f["action"] in REVOKE_ACTIONS]
        status["last_outcome"] = "partial" if result["failures"] else "ok"
        status["last_error"] = "; ".join("%s: %s" % (f["user"], f["action"]) for f in result["failures"]) or None
        if not failed_revocations:
            status["last_success"] = started
        save_status(status_path, status)
        result.update(staleness(status, config, now))
        return result


# Steps whose failure means a revocation was not applied: such a run is not a good sync. ("remove groups":
# a group the configuration no longer grants, sudo included, that could not be taken back.)
REVOKE_ACTIONS = frozenset(["revoke keys", "lock", "end sessions", "userdel", "end key sessions", "clear keys",
                            "retire", "withhold keys", "sudoers", "remove groups"])


def _lock_everyone(config, backend, state_path, log):
    """stale_action lock: lock every synced user that is not locked yet (never admins or system accounts)."""
    state = load_state(state_path)
    locks_made = dict(state.get("locks_made", {}))
    locked = []
    never = set(DEFAULT_DENY_USERS) | set(config.admin_users)
    for name, info in sorted(backend.list_users().items()):
        if (config.marker_group not in info.groups or info.locked or name in never
                or info.uid <= config.system_uid_max):
            continue
        try:
            locks_made[name] = backend.lock_user(name)
        except (KeySyncError, OSError) as exc:
            log("stale: could not lock %s: %s" % (name, exc))
            continue
        locked.append(name)
    backend.flush()
    if locked:
        log("stale: locked %s (no good sync for more than max_sync_age %ds)" % (", ".join(locked), config.max_sync_age))
        state.setdefault("version", STATE_VERSION)
        state["locks_made"] = locks_made
        save_state(state_path, state)
    return locked


def _local_size_limit(config, candidates):
    """The largest authorized_keys the sync could have written: anything larger is not read."""
    per_key = len(",".join(config.prepend_options)) + 2
    per_user = config.max_object_size + config.max_keys_per_user * per_key
    if config.mode == PER_USER:
        return per_user
    # shared_user: every user's keys plus the static keys and the header
    return per_user * (candidates + 1) + sum(len(line) + 1 for line in config.static_keys) + 4096


def _sync_locked(config, s3, backend, check_mode, call_kwargs, log, state_path):
    """One run under the lock (or in check mode): read S3 and the host, decide, then report or apply."""
    counter = RequestCounter()
    state = load_state(state_path)
    users = backend.list_users()
    managed = [u for u in users.values() if config.marker_group in u.groups and not u.locked]
    bucket = _read_bucket(s3, config, state, counter, call_kwargs)
    desired, new_objects, rejected, stats, failed, listed, membership, teams_manifest = bucket
    plan, history = _decide(config, state, users, managed, desired, rejected, failed, listed, membership)
    shared = config.mode != PER_USER
    store = KeyFileStore(config, _local_size_limit(config, stats["candidates"]))
    result = _new_result(plan, _download_failures(failed, users), stats, counter, check_mode)
    removed, removed_keys = _report_key_changes(config, plan, users, store, shared, result)
    result["timings"] = counter.timings()
    if check_mode:
        result["changed"] = _would_change(config, plan, users, store, shared, result)
        return result

    locks_made = dict(history.get("locks_made", {}))
    retired = dict(history.get("retired_uids", {}))
    try:
        changed = _apply(config, plan, users, backend, store, result, log, locks_made, retired, removed_keys)
    finally:
        backend.flush()
        store.flush()
    for name, note in store.notes:
        result["rejected"].append({"object": config.prefix + name + ".pub", "user": name, "line": None,
                                   "reason": note})
    present = set(backend.list_users()) if (plan.create or removed) else set(users)
    new_state = _new_state(config, plan, new_objects, present, result, locks_made, retired, teams_manifest)
    if new_state != state:
        save_state(state_path, new_state)
    result["changed"] = changed
    result["requests"] = counter.as_dict()
    result["timings"] = counter.timings()
    return result


def _read_bucket(s3, config, state, counter, call_kwargs):
    """What the bucket says: collect()'s (desired, new objects, rejected, stats, failed, listed), then the team
    manifest's (membership, state entry), both None without ``teams``; its warnings join ``rejected``."""
    collected = collect(s3, config, state, counter, call_kwargs)
    desired, new_objects, rejected, stats, failed, listed, teams_object = collected
    membership, teams_manifest = None, None
    if config.teams is not None:
        membership, teams_manifest, team_warnings = load_teams(s3, config, state, teams_object, listed, counter,
                                                               call_kwargs)
        rejected.extend(team_warnings)
    return desired, new_objects, rejected, stats, failed, listed, membership, teams_manifest


def _decide(config, state, users, managed, desired, rejected, failed, listed, membership):
    """(plan, history): the plan of the mode, after the fail-closed listing size check (FailClosedError)."""
    same_source = state.get("bucket") == config.bucket and state.get("prefix") == config.prefix
    history = state if same_source else dict((k, v) for k, v in state.items() if k != "missing")
    previous = state.get("valid_count", 0) if same_source else 0

    shared = config.mode != PER_USER
    if shared:
        if config.shared_user not in users:
            raise UserBackendError("shared_user %r does not exist on this host; create it first; nothing was changed"
                                   % config.shared_user)
        plan = plan_shared_user(desired, config, rejected, withheld=failed)
    else:
        plan = plan_per_user(desired, users, config, history, rejected, withheld=failed, listed=listed,
                             membership=membership)
        previous = max(previous, len(managed))
    check_listing_size(plan.accepted, previous, config)
    return plan, history


def _download_failures(failed, users):
    """One failure entry per user whose object could not be downloaded."""
    failures = []
    for name in sorted(failed):
        outcome = ("the user keeps no key newer than the last verified object (no key this run)" if name in users
                   else "the user is not created")
        failures.append({"user": name, "action": "download", "message": "%s; %s" % (failed[name], outcome)})
    return failures


def _new_result(plan, failures, stats, counter, check_mode):
    """The run's result before anything is applied (check mode reports what would be locked and removed)."""
    return {
        "changed": False,
        "users_created": [name for name, _uid in plan.create],
        "users_unlocked": list(plan.unlock),
        "users_groups_added": [{"user": n, "groups": g} for n, g in plan.add_groups],
        "users_groups_removed": [{"user": n, "groups": g} for n, g in plan.remove_groups],
        "users_revoked": [r["user"] for r in plan.revoke],
        "users_locked": [r["user"] for r in plan.revoke if r["lock"]] if check_mode else [],
        "users_removed": [r["user"] for r in plan.revoke if r["userdel"]] if check_mode else [],
        "users_sessions_ended": [],
        "sessions_ended": [],
        "users_pending_removal": dict(plan.pending_removal),
        "users_locked_by_admin": list(plan.admin_locked),
        "users_not_admitted": list(plan.not_admitted),
        "sudoers_users": list(plan.sudoers),
        "keys_added": [],
        "keys_removed": [],
        "files_written": [],
        "rejected": plan.rejected,
        "failures": failures,
        "objects": stats,
        "requests": counter.as_dict(),
        "check_mode": check_mode,
    }


def _report_key_changes(config, plan, users, store, shared, result):
    """Fill ``keys_added``, ``keys_removed`` and ``diff`` of ``result``; (users the plan removes, {name:
    fingerprints of keys on the host now that the plan drops})."""
    before, after = {}, {}
    removed_keys = {}   # name -> fingerprints of keys on the host now that the plan drops
    # Diff: only users whose key lines change (an unchanged fleet costs no key parsing here).
    removed = set(r["user"] for r in plan.revoke if r["userdel"])
    for name in sorted(plan.keys):
        info = users.get(name)
        current = _current_lines(store.read(info), shared, config.static_keys) if info is not None else []
        wanted = plan.keys[name]
        if current == wanted and name not in removed:
            continue
        if current or info is not None:
            before[name] = current
        if name not in removed:
            after[name] = wanted
        old_set, new_set = set(current), set(wanted)
        for item in key_summary(sorted(new_set - old_set)):
            result["keys_added"].append({"user": name, "key": item})
        for item in key_summary(sorted(old_set - new_set)):
            result["keys_removed"].append({"user": name, "key": item})
        gone = fingerprints(old_set) - fingerprints(new_set)
        if gone:
            removed_keys[name] = gone
    result["diff"] = {"before": _describe(before), "after": _describe(after),
                      "before_header": "s3://%s/%s (host now)" % (config.bucket, config.prefix),
                      "after_header": "s3://%s/%s (after sync)" % (config.bucket, config.prefix)}
    return removed, removed_keys


def _would_change(config, plan, users, store, shared, result):
    """Check mode: whether applying the plan would change anything."""
    return bool(plan.user_changes or result["keys_added"] or result["keys_removed"]
                or (read_sudoers(config.root) or "") != render_sudoers(plan.sudoers)
                or any(_needs_write(store, users.get(n), plan.keys[n], shared, config)
                       for n in plan.keys if users.get(n) is not None))


def _new_state(config, plan, new_objects, present, result, locks_made, retired, teams_manifest):
    """The state to keep after an applied run; entries of users no longer ``present`` are dropped."""
    failed_creates = set(f["user"] for f in result["failures"] if f["action"] == "create")
    granted = dict((n, g) for n, g in plan.granted.items() if n in present and n not in failed_creates)
    for name, groups in _drops_not_done(plan, result).items():  # still granted: the next run takes them again
        if name in present:
            granted[name] = sorted(set(granted.get(name, ())) | set(groups))
    new_state = {
        "version": STATE_VERSION,
        "bucket": config.bucket,
        "prefix": config.prefix,
        "objects": new_objects,
        "valid_count": plan.accepted,
        "missing": dict((n, c) for n, c in plan.missing.items() if n in present),
        "locks_made": dict((n, v) for n, v in locks_made.items() if n in present),
        "granted": granted,
        "retired_uids": retired,
    }
    if teams_manifest is not None:
        new_state["teams_manifest"] = teams_manifest
    return new_state


def _drops_not_done(plan, result):
    """{user: groups} the plan took away (revocations, grants no longer made) whose removal failed this run."""
    failed = set(f["user"] for f in result["failures"] if f["action"] == "remove groups")
    drops = {}
    for entry in plan.revoke:
        if entry["user"] in failed and entry["drop_groups"]:
            drops.setdefault(entry["user"], set()).update(entry["drop_groups"])
    for name, groups in plan.remove_groups:
        if name in failed:
            drops.setdefault(name, set()).update(groups)
    return drops


def _step(result, name, action, func, *args):
    """Run one account or file step for one user; a failure is recorded and the run goes on. (ok, value)."""
    try:
        return True, func(*args)
    except (KeySyncError, OSError) as exc:
        message = str(exc) if isinstance(exc, KeySyncError) else "%s: %s" % (type(exc).__name__, exc)
        result["failures"].append({"user": name, "action": action, "message": message})
        return False, None


def _revoke(config, entry, info, backend, store, result, log, locks_made, retired):
    """Take one user's access away. Each step runs whatever the previous one did; True when anything changed.

    Keys first (no new session), then the lock, what would start again later (lingering, subordinate IDs,
    with ``removal: keep`` cron and at jobs), then every process. The keys are taken once more after that: in
    home-directory mode a process of the user could have written a key back before it was killed, and a
    session opened with it is ended by a second pass.
    """
    name = entry["user"]
    changed = False
    _ok, did = _step(result, name, "revoke keys", store.revoke, info)
    changed = changed or bool(did)
    if entry["lock"]:
        log("locking user %s (no key file or no valid key)" % name)
        ok, saved = _step(result, name, "lock", backend.lock_user, name)
        if ok:
            locks_made[name] = saved
            result["users_locked"].append(name)
            changed = True
    if entry["drop_groups"]:
        ok, _none = _step(result, name, "remove groups", backend.remove_groups, name, entry["drop_groups"])
        changed = changed or ok
    ok, retired_what = _step(result, name, "retire", backend.retire, name, info.uid, config.removal == "keep")
    if ok and retired_what:
        log("%s: %s" % (name, "; ".join(retired_what)))
        changed = True
    ended = _end_user(result, name, info, backend, log, entry.get("fresh", True))
    _ok, again = _step(result, name, "revoke keys", store.revoke, info)
    if again:
        log("%s had written a key back before their processes ended; removed it again" % name)
        ended = _end_user(result, name, info, backend, log, True) or ended
    changed = changed or ended or bool(again)
    if entry["userdel"]:
        log("removing user %s (key file gone)" % name)
        ok, _none = _step(result, name, "userdel", backend.remove_user, name)
        if ok:
            retired[str(info.uid)] = name
            locks_made.pop(name, None)
            result["users_removed"].append(name)
            changed = True
    return changed


def _end_user(result, name, info, backend, log, fresh=True):
    """End every session and process of one user; True when anything ran."""
    _ok, ended = _step(result, name, "end sessions", backend.end_sessions, name, info.uid, info.gid, fresh)
    if ended:
        log("ended the sessions and processes of %s (UID %d)" % (name, info.uid))
        if name not in result["users_sessions_ended"]:
            result["users_sessions_ended"].append(name)
    return bool(ended)


def _apply(config, plan, users, backend, store, result, log, locks_made, retired, removed_keys=None):
    """Carry out the plan: every revocation first, then grants. Each user on their own. True when anything changed."""
    removed_keys = removed_keys or {}
    shared = config.mode != PER_USER
    revoked = set(entry["user"] for entry in plan.revoke)
    changed = _apply_sudoers(plan, backend, result, log)
    changed = _apply_revocations(config, plan, users, backend, store, result, log, locks_made, retired) or changed
    groups_made, grant_failure = _prepare_grants(config, plan, backend)
    changed = changed or groups_made
    created = _create_users(config, plan, backend, result, log, grant_failure)
    changed = changed or bool(created)
    changed = _drop_sudoers_not_created(plan, created, backend, result) or changed
    changed = _add_groups(plan, backend, result, grant_failure) or changed
    unlocked = _unlock_users(config, plan, backend, result, log, locks_made)
    changed = changed or bool(unlocked)
    result["users_created"] = created
    result["users_unlocked"] = unlocked
    if created:
        users = backend.list_users()
    done = revoked | set(plan.withheld)
    todo = [name for name in sorted(plan.keys) if users.get(name) is not None and name not in done]
    written = _write_key_files(config, plan, users, backend, store, result, log, locks_made, todo)
    result["files_written"].extend(written)
    # A key that is gone must not keep the sessions it opened (after the write: no new session can use it).
    for name in sorted(set(removed_keys) & set(todo)):
        if _end_removed_key_sessions(name, users[name], shared, removed_keys[name], backend, result, log):
            changed = True
    return changed or bool(written)


def _apply_sudoers(plan, backend, result, log):
    """Sudo rights first: the drop-in lists exactly the users the plan gives sudo (none in shared_user mode or
    without teams, which removes a drop-in left from earlier), so a revoked user's sudo is gone before their
    processes are ended; a drop-in that cannot be written or checked is removed (nobody keeps sudo from it)."""
    _ok, did = _step(result, SUDOERS_SUBJECT, "sudoers", backend.write_sudoers, list(plan.sudoers))
    if did:
        log("sudoers drop-in now lists: %s" % (", ".join(plan.sudoers) or "nobody (removed)"))
    return bool(did)


def _apply_revocations(config, plan, users, backend, store, result, log, locks_made, retired):
    """Every revocation, user by user: revoked users, then users whose download failed, then groups the
    configuration no longer grants. True when anything changed."""
    changed = False
    for entry in plan.revoke:
        if _revoke(config, entry, users[entry["user"]], backend, store, result, log, locks_made, retired):
            changed = True
    for name in plan.withheld:  # download failed: no keys this run, and no session of a key that may be gone
        ok, did = _step(result, name, "withhold keys", store.write, users[name], render_user([]))
        if not ok:
            _clear_or_lock(config, result, name, users[name], backend, store, log, locks_made)
        changed = _end_user(result, name, users[name], backend, log) or changed or bool(did)
    for name, groups in plan.remove_groups:
        ok, _none = _step(result, name, "remove groups", backend.remove_groups, name, groups)
        changed = changed or ok
    return changed


def _prepare_grants(config, plan, backend):
    """Make the groups the grants need. (True when one was created, ``grant_failure(groups)``: why a user who
    would get ``groups`` cannot be granted now, or None)."""
    changed = False
    grant_error = None
    if plan.create or plan.add_groups:
        try:
            if backend.ensure_group(config.marker_group):
                changed = True
            if config.sudo_group and not backend.group_exists(config.sudo_group):
                raise UserBackendError("sudo_group %r does not exist on this host; create it or unset sudo_group"
                                       % config.sudo_group)
        except (KeySyncError, OSError) as exc:
            grant_error = str(exc)
    # Groups the teams grant are created when missing (the host's configuration names them); one that cannot
    # be made fails only the users who would get it.
    group_errors = {}
    team_groups = set()
    for name, _uid in plan.create:
        team_groups.update(plan.granted.get(name, ()))
    for name, groups in plan.add_groups:
        team_groups.update(groups)
    for group in sorted(team_groups - {config.marker_group, config.sudo_group}):
        try:
            if backend.ensure_group(group):
                changed = True
        except (KeySyncError, OSError) as exc:
            group_errors[group] = "group %s: %s" % (group, exc)

    def grant_failure(groups):
        return grant_error or "; ".join(group_errors[g] for g in groups if g in group_errors) or None

    return changed, grant_failure


def _create_users(config, plan, backend, result, log, grant_failure):
    """Create the new accounts whose groups could be made; the names created."""
    created = []
    for name, uid in plan.create:
        groups = plan.granted.get(name) or [config.marker_group]
        error = grant_failure(groups)
        if error:
            result["failures"].append({"user": name, "action": "create", "message": error})
            continue
        log("creating user %s (uid %d)" % (name, uid))
        ok, _none = _step(result, name, "create", backend.create_user, name, uid, groups, config.shell,
                          "%s/%s" % (config.home_base.rstrip("/"), name))
        if ok:
            created.append(name)
    return created


def _drop_sudoers_not_created(plan, created, backend, result):
    """No sudo line for an account that does not exist: rewrite the drop-in without accounts whose creation failed."""
    not_created = set(name for name, _uid in plan.create) - set(created)
    if not not_created & set(plan.sudoers):
        return False
    plan.sudoers = [name for name in plan.sudoers if name not in not_created]
    result["sudoers_users"] = list(plan.sudoers)
    _ok, did = _step(result, SUDOERS_SUBJECT, "sudoers", backend.write_sudoers, list(plan.sudoers))
    return bool(did)


def _add_groups(plan, backend, result, grant_failure):
    """Add existing users to the groups they are granted now; True when any was added."""
    changed = False
    for name, groups in plan.add_groups:
        error = grant_failure(groups)
        if error:
            result["failures"].append({"user": name, "action": "add groups", "message": error})
            continue
        ok, _none = _step(result, name, "add groups", backend.add_groups, name, groups)
        changed = changed or ok
    return changed


def _unlock_users(config, plan, backend, result, log, locks_made):
    """Unlock the accounts the sync locked and that have keys again; the names unlocked."""
    unlocked = []
    for name in plan.unlock:
        log("unlocking user %s" % name)
        saved = locks_made.get(name) or {"expiry": "", "shell": config.shell}  # a lock recorded before 0.1.0
        ok, _none = _step(result, name, "unlock", backend.unlock_user, name, saved)
        if ok:
            locks_made.pop(name, None)
            unlocked.append(name)
    return unlocked


def _write_key_files(config, plan, users, backend, store, result, log, locks_made, todo):
    """Write the key file of every user in ``todo``; the names whose file changed. A file that cannot be
    written is cleared (or the account locked)."""
    shared = config.mode != PER_USER

    def write_keys(name):
        info = users[name]
        content = render_shared(config.static_keys, plan.keys[name]) if shared else render_user(plan.keys[name])
        ok, did = _step(result, name, "write authorized_keys", store.write, info, content)
        if not ok:
            _clear_or_lock(config, result, name, info, backend, store, log, locks_made)
        return bool(did)

    # Each file is fsynced before its rename; the fsyncs overlap across threads (the file system commits them
    # together), which is what makes a first sync of 1,000 users cheap. Each user's file is its own.
    written = []
    if len(todo) > 1:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(config.download_workers, len(todo))) as pool:
            for name, did in zip(todo, pool.map(write_keys, todo)):
                if did:
                    written.append(name)
    elif todo and write_keys(todo[0]):
        written.append(todo[0])
    return written


def _end_removed_key_sessions(name, info, shared, gone, backend, result, log):
    """End what a removed key opened: its own sessions in shared_user mode, else every session of the user."""
    if shared:
        ok, pids = _step(result, name, "end key sessions", backend.end_key_sessions, name, gone)
        if ok and pids:
            log("ended %d session(s) of %s opened with a removed key" % (len(pids), name))
            result["sessions_ended"].extend({"user": name, "pid": pid} for pid in pids)
            return True
        return False
    return _end_user(result, name, info, backend, log)


def _clear_or_lock(config, result, name, info, backend, store, log, locks_made):
    """A key file that cannot be written must not keep the old keys: remove it, and when even that fails,
    lock the account (per_user mode) so that no key opens it."""
    ok, _did = _step(result, name, "clear keys", store.clear, info)
    if ok:
        result["failures"].append({"user": name, "action": "write authorized_keys",
                                   "message": "the key file could not be written; it was removed: the user has no "
                                              "keys until the next run writes it"})
        return
    if config.mode == PER_USER and not info.locked:
        ok, saved = _step(result, name, "lock", backend.lock_user, name)
        if ok:
            locks_made[name] = saved
            log("locked %s: the key file could neither be written nor removed" % name)


def _needs_write(store, info, lines, shared, config):
    current = store.read(info)
    if shared:
        return current != render_shared(config.static_keys, lines)
    return current != render_user(lines)

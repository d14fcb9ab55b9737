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

The S3 client is any boto3-compatible client; ``call_kwargs`` is added to every
call (the module passes ``aws_retry=True`` for amazon.aws's retry wrapper; the
host tool relies on botocore's standard retry mode). The paginator and error
reading below are our own, not amazon.aws's, because the host tool runs on hosts
without amazon.aws installed.
"""

from __future__ import annotations

import concurrent.futures
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    PER_USER,
    DownloadError,
    KeyLineError,
    KeySyncError,
    ListingError,
    UserBackendError,
    check_listing_size,
    decode_object,
    key_summary,
    parse_key_file,
    parse_key_line,
    plan_per_user,
    plan_shared_user,
    render_shared,
    render_user,
    username_from_key,
    validate_username,
    MARKER_LINE,
)
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import (
    STATE_VERSION,
    KeyFileStore,
    SyncLock,
    load_state,
    rooted,
    save_state,
)

PAGE_SIZE = 1000
# 100 pages of 1,000 keys: no bastion has 100,000 users. More means a listing that never ends.
MAX_PAGES = 100


def _error_text(exc):
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return "%s (HTTP %s): %s" % (error.get("Code", type(exc).__name__), status, error.get("Message", exc))
    return "%s: %s" % (type(exc).__name__, exc)


class RequestCounter:
    """S3 requests made, and the wall time spent waiting for them."""

    def __init__(self):
        self.list = 0
        self.get = 0
        self.list_seconds = 0.0
        self.download_seconds = 0.0

    def timings(self):
        return {"list_s": round(self.list_seconds, 3), "download_s": round(self.download_seconds, 3)}

    def as_dict(self):
        return {"list": self.list, "get": self.get}


def list_key_objects(s3, bucket, prefix, counter, call_kwargs=None, max_pages=MAX_PAGES):
    """Every object under ``prefix`` as {key: (etag, size)}; raise ListingError on any doubt."""
    call_kwargs = call_kwargs or {}
    objects = {}
    token = None
    seen_tokens = set()
    pages = 0
    while True:
        params = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_SIZE}
        if token:
            params["ContinuationToken"] = token
        if pages >= max_pages:
            raise ListingError("listing s3://%s/%s goes on past %d pages (%d keys); no key prefix holds that many "
                               "users, so nothing was changed" % (bucket, prefix, max_pages, len(objects)))
        pages += 1
        counter.list += 1
        started = time.monotonic()
        try:
            page = s3.list_objects_v2(**dict(params, **call_kwargs))
        except Exception as exc:  # pylint: disable=broad-exception-caught
            raise ListingError("listing s3://%s/%s failed on page %d: %s; nothing was changed"
                               % (bucket, prefix, pages, _error_text(exc))) from exc
        counter.list_seconds += time.monotonic() - started
        contents = page.get("Contents", []) or []
        if "KeyCount" in page and page["KeyCount"] != len(contents) + len(page.get("CommonPrefixes", []) or []):
            raise ListingError("listing s3://%s/%s page %d says %s keys but carries %d; nothing was changed"
                               % (bucket, prefix, pages, page["KeyCount"], len(contents)))
        for item in contents:
            objects[item["Key"]] = (item.get("ETag", ""), int(item.get("Size", 0)))
        if page.get("IsTruncated"):
            token = page.get("NextContinuationToken")
            if not token:
                raise ListingError("listing s3://%s/%s was cut short (truncated without a continuation token); "
                                   "nothing was changed" % (bucket, prefix))
            if token in seen_tokens:
                raise ListingError("listing s3://%s/%s repeated a continuation token on page %d (the listing loops); "
                                   "nothing was changed" % (bucket, prefix, pages))
            seen_tokens.add(token)
            continue
        return objects


def download_objects(s3, bucket, wanted, counter, workers, call_kwargs=None):
    """({key: bytes}, {key: error}) for ``wanted`` {key: (etag, size)}: a failure affects only its own object.

    At most ``workers`` GETs run at once. Each carries ``If-Match`` with the listed ETag and its body must be
    exactly the listed Size (a truncated body is a failure).
    """
    call_kwargs = call_kwargs or {}

    def fetch(key):
        etag, size = wanted[key]
        params = {"Bucket": bucket, "Key": key}
        if etag:
            params["IfMatch"] = etag
        response = s3.get_object(**dict(params, **call_kwargs))
        body = response["Body"].read(size + 1)
        if len(body) != size:
            raise DownloadError("got %d bytes, the listing said %d" % (len(body), size))
        return body

    results = {}
    errors = {}
    if not wanted:
        return results, errors
    counter.get += len(wanted)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(wanted))) as pool:
        futures = dict((pool.submit(fetch, key), key) for key in sorted(wanted))
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            try:
                results[key] = future.result()
            except DownloadError as exc:
                errors[key] = "downloading s3://%s/%s failed: %s" % (bucket, key, exc)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                errors[key] = "downloading s3://%s/%s failed: %s" % (bucket, key, _error_text(exc))
    counter.download_seconds += time.monotonic() - started
    return results, errors


def _reject(rejected, obj, user, line, reason):
    rejected.append({"object": obj, "user": user, "line": line, "reason": reason})


def collect(s3, config, state, counter, call_kwargs=None):
    """List, download what changed, parse.

    Returns (desired {user: [PublicKey]}, new object state, rejected, stats, failed {user: reason}, listed names).
    ``desired`` holds only users whose current object has at least one valid key: an object without one counts
    as gone. ``failed`` holds users whose changed object could not be downloaded: they keep nothing newer than
    what was verified (their old entry stays in the state, so the next run tries again).
    """
    listing = list_key_objects(s3, config.bucket, config.prefix, counter, call_kwargs)
    same_source = state.get("bucket") == config.bucket and state.get("prefix") == config.prefix
    old_objects = state.get("objects", {}) if same_source else {}
    rejected = []
    candidates = {}
    for key in sorted(listing):
        etag, size = listing[key]
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
    to_fetch = {}
    for key, (name, etag, size) in candidates.items():
        old = old_objects.get(key)
        if not (old and old.get("etag") == etag and old.get("size") == size and etag):
            to_fetch[key] = (etag, size)
    bodies, errors = download_objects(s3, config.bucket, to_fetch, counter, config.download_workers, call_kwargs)
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
        if key in bodies:
            try:
                text = decode_object(bodies[key])
                keys, bad_lines = parse_key_file(text, config.allowed_options, config.max_keys_per_user)
            except KeyLineError as exc:
                keys, bad_lines = [], [(None, str(exc))]
            entry = {"etag": etag, "size": size, "user": name,
                     "keys": [k.line() for k in keys],
                     "rejected": [[n, r] for n, r in bad_lines]}
        else:
            entry = old
        for number, reason in entry.get("rejected", []):
            _reject(rejected, key, name, number, reason)
        new_objects[key] = entry
        parsed = []
        for line in entry.get("keys", []):
            try:
                parsed.append(parse_key_line(line, config.allowed_options))
            except KeyLineError as exc:  # the policy changed since the state was written
                _reject(rejected, key, name, None, "stored key refused by the current policy: %s" % exc)
        if parsed:
            desired[name] = parsed
        else:
            refused = ", ".join("line %s" % n if n else "the file" for n, _r in entry.get("rejected", []))
            _reject(rejected, key, name, None, "no valid key in the object (refused: %s); the user's access is "
                    "revoked as if the object were deleted" % (refused or "nothing but comments"))
    stats = {"listed": len(listing), "candidates": len(candidates), "downloaded": len(bodies),
             "reused": len(candidates) - len(bodies) - len(errors), "failed": len(errors)}
    listed = sorted(set(name for name, _etag, _size in candidates.values()))
    return desired, new_objects, rejected, stats, failed, listed


def _managed_lines(text, shared):
    if text is None:
        return []
    lines = text.splitlines()
    if shared:
        if MARKER_LINE not in [line.strip() for line in lines]:
            return []
        lines = lines[[line.strip() for line in lines].index(MARKER_LINE) + 1:]
    return [line for line in lines if line.strip() and not line.strip().startswith("#")]


def _describe(keys_by_user):
    out = []
    for user in sorted(keys_by_user):
        summary = key_summary(keys_by_user[user])
        if not summary:
            out.append("%s: (no keys)" % user)
        for item in summary:
            out.append("%s: %s" % (user, item))
    return "\n".join(out) + ("\n" if out else "")


def sync(config, s3, backend, check_mode=False, call_kwargs=None, log=None):
    """One run. Returns a result dict; raises a KeySyncError subclass when nothing was changed.

    A result with ``failed`` entries means the run went on past per-user failures: the entry points report
    each one and exit non-zero.
    """
    log = log or (lambda message: None)
    state_path = rooted(config.root, config.state_path)
    lock_path = rooted(config.root, config.lock_path)
    if check_mode:
        return _sync_locked(config, s3, backend, True, call_kwargs, log, state_path)
    with SyncLock(lock_path, config.lock_timeout):
        return _sync_locked(config, s3, backend, False, call_kwargs, log, state_path)


def _local_size_limit(config, candidates):
    """The largest authorized_keys the sync could have written: anything larger is not read."""
    per_key = len(",".join(config.prepend_options)) + 2
    per_user = config.max_object_size + config.max_keys_per_user * per_key
    if config.mode == PER_USER:
        return per_user
    # shared_user: every user's keys plus room for the break-glass lines above the marker
    return per_user * (candidates + 1) + len(MARKER_LINE) + 1


def _sync_locked(config, s3, backend, check_mode, call_kwargs, log, state_path):
    counter = RequestCounter()
    state = load_state(state_path)
    users = backend.list_users()
    managed = [u for u in users.values() if config.marker_group in u.groups and not u.locked]
    desired, new_objects, rejected, stats, failed, listed = collect(s3, config, state, counter, call_kwargs)
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
        plan = plan_per_user(desired, users, config, history, rejected, withheld=failed, listed=listed)
        previous = max(previous, len(managed))
    check_listing_size(plan.accepted, previous, config)

    store = KeyFileStore(config, _local_size_limit(config, stats["candidates"]))
    failures = []
    for name in sorted(failed):
        outcome = ("the user keeps no key newer than the last verified object (no key this run)" if name in users
                   else "the user is not created")
        failures.append({"user": name, "action": "download", "message": "%s; %s" % (failed[name], outcome)})
    result = {
        "changed": False,
        "users_created": [name for name, _uid in plan.create],
        "users_unlocked": list(plan.unlock),
        "users_groups_added": [{"user": n, "groups": g} for n, g in plan.add_groups],
        "users_groups_removed": [{"user": n, "groups": g} for n, g in plan.remove_groups],
        "users_revoked": [r["user"] for r in plan.revoke],
        "users_locked": [r["user"] for r in plan.revoke if r["lock"]] if check_mode else [],
        "users_removed": [r["user"] for r in plan.revoke if r["userdel"]] if check_mode else [],
        "users_sessions_ended": [],
        "users_pending_removal": dict(plan.pending_removal),
        "users_locked_by_admin": list(plan.admin_locked),
        "keys_added": [],
        "keys_removed": [],
        "files_written": [],
        "rejected": plan.rejected,
        "failures": failures,
        "objects": stats,
        "requests": counter.as_dict(),
        "check_mode": check_mode,
    }
    before, after = {}, {}
    # Diff: only users whose managed lines change (an unchanged fleet costs no key parsing here).
    removed = set(r["user"] for r in plan.revoke if r["userdel"])
    for name in sorted(plan.keys):
        info = users.get(name)
        current = _managed_lines(store.read(info), shared) if info is not None else []
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
    result["diff"] = {"before": _describe(before), "after": _describe(after),
                      "before_header": "s3://%s/%s (host now)" % (config.bucket, config.prefix),
                      "after_header": "s3://%s/%s (after sync)" % (config.bucket, config.prefix)}

    result["timings"] = counter.timings()
    if check_mode:
        result["changed"] = bool(plan.user_changes or result["keys_added"] or result["keys_removed"]
                                 or any(_needs_write(store, users.get(n), plan.keys[n], shared)
                                        for n in plan.keys if users.get(n) is not None))
        return result

    locks_made = set(history.get("locks_made", []))
    retired = dict(history.get("retired_uids", {}))
    try:
        changed = _apply(config, plan, users, backend, store, result, log, locks_made, retired)
    finally:
        backend.flush()
        store.flush()
    for name, note in store.notes:
        result["rejected"].append({"object": config.prefix + name + ".pub", "user": name, "line": None,
                                   "reason": note})
    present = set(backend.list_users()) if (plan.create or removed) else set(users)
    failed_creates = set(f["user"] for f in result["failures"] if f["action"] == "create")
    new_state = {
        "version": STATE_VERSION,
        "bucket": config.bucket,
        "prefix": config.prefix,
        "objects": new_objects,
        "valid_count": plan.accepted,
        "missing": dict((n, c) for n, c in plan.missing.items() if n in present),
        "locks_made": sorted(n for n in locks_made if n in present),
        "granted": dict((n, g) for n, g in plan.granted.items() if n in present and n not in failed_creates),
        "retired_uids": retired,
    }
    if new_state != state:
        save_state(state_path, new_state)
    result["changed"] = changed
    result["requests"] = counter.as_dict()
    result["timings"] = counter.timings()
    return result


def _step(result, name, action, func, *args):
    """Run one account or file step for one user; a failure is recorded and the run goes on. (ok, value)."""
    try:
        return True, func(*args)
    except (KeySyncError, OSError) as exc:
        message = str(exc) if isinstance(exc, KeySyncError) else "%s: %s" % (type(exc).__name__, exc)
        result["failures"].append({"user": name, "action": action, "message": message})
        return False, None


def _revoke(config, entry, info, backend, store, result, log, locks_made, retired):
    """Take one user's access away. Each step runs whatever the previous one did; True when anything changed."""
    name = entry["user"]
    changed = False
    _ok, did = _step(result, name, "revoke keys", store.revoke, info)
    changed = changed or bool(did)
    if entry["lock"]:
        log("locking user %s (no key file or no valid key)" % name)
        ok, _none = _step(result, name, "lock", backend.lock_user, name)
        if ok:
            locks_made.add(name)
            result["users_locked"].append(name)
            changed = True
    if entry["drop_groups"]:
        ok, _none = _step(result, name, "remove groups", backend.remove_groups, name, entry["drop_groups"])
        changed = changed or ok
    _ok, ended = _step(result, name, "end sessions", backend.end_sessions, name, info.uid, info.gid)
    if ended:
        log("ended the sessions and processes of %s (UID %d)" % (name, info.uid))
        result["users_sessions_ended"].append(name)
        changed = True
    if entry["userdel"]:
        log("removing user %s (key file gone)" % name)
        ok, _none = _step(result, name, "userdel", backend.remove_user, name)
        if ok:
            retired[str(info.uid)] = name
            locks_made.discard(name)
            result["users_removed"].append(name)
            changed = True
    return changed


def _apply(config, plan, users, backend, store, result, log, locks_made, retired):
    """Carry out the plan: every revocation first, then grants. Each user on their own. True when anything changed."""
    changed = False
    shared = config.mode != PER_USER
    for entry in plan.revoke:
        if _revoke(config, entry, users[entry["user"]], backend, store, result, log, locks_made, retired):
            changed = True
    for name in plan.withheld:  # download failed: no keys this run, nothing else changes
        _ok, did = _step(result, name, "withhold keys", store.write, users[name], render_user([]))
        changed = changed or bool(did)
    wanted_groups = [config.marker_group] + ([config.sudo_group] if config.sudo_group else [])
    for name, groups in plan.remove_groups:
        ok, _none = _step(result, name, "remove groups", backend.remove_groups, name, groups)
        changed = changed or ok
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
    created = []
    for name, uid in plan.create:
        if grant_error:
            result["failures"].append({"user": name, "action": "create", "message": grant_error})
            continue
        log("creating user %s (uid %d)" % (name, uid))
        ok, _none = _step(result, name, "create", backend.create_user, name, uid, wanted_groups, config.shell,
                          "%s/%s" % (config.home_base.rstrip("/"), name))
        if ok:
            created.append(name)
            changed = True
    for name, groups in plan.add_groups:
        if grant_error:
            result["failures"].append({"user": name, "action": "add groups", "message": grant_error})
            continue
        ok, _none = _step(result, name, "add groups", backend.add_groups, name, groups)
        changed = changed or ok
    unlocked = []
    for name in plan.unlock:
        log("unlocking user %s" % name)
        ok, _none = _step(result, name, "unlock", backend.unlock_user, name, config.shell)
        if ok:
            locks_made.discard(name)
            unlocked.append(name)
            changed = True
    result["users_created"] = created
    result["users_unlocked"] = unlocked
    if created:
        users = backend.list_users()
    revoked = set(entry["user"] for entry in plan.revoke) | set(plan.withheld)
    todo = [name for name in sorted(plan.keys) if users.get(name) is not None and name not in revoked]

    def write_keys(name):
        info = users[name]
        text = plan.keys[name]
        if shared:
            ok, current = _step(result, name, "read authorized_keys", store.read_strict, info)
            if not ok:
                return False
            content = render_shared(current, text)
        else:
            content = render_user(text)
        _ok, did = _step(result, name, "write authorized_keys", store.write, info, content)
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
    result["files_written"].extend(written)
    return changed or bool(written)


def _needs_write(store, info, lines, shared):
    current = store.read(info)
    if shared:
        return current != render_shared(current, lines)
    return current != render_user(lines)

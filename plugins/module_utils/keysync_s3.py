# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync, one run: list S3, download what changed, plan, apply, keep state.

``sync()`` is the single implementation behind both entry points (the module
and ``keysync_host``). Its order is what makes it fail closed: every S3 call
happens before anything on disk changes, so a failed or cut-short listing, a
failed download or a suspicious listing raises before the first write.

The S3 client is any boto3-compatible client; ``call_kwargs`` is added to every
call (the module passes ``aws_retry=True`` for amazon.aws's retry wrapper; the
host tool relies on botocore's standard retry mode).
"""

from __future__ import annotations

import concurrent.futures
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    PER_USER,
    ApplyError,
    DownloadError,
    KeyLineError,
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
    KeyFileStore,
    SyncLock,
    load_state,
    rooted,
    save_state,
)

PAGE_SIZE = 1000


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


def list_key_objects(s3, bucket, prefix, counter, call_kwargs=None):
    """Every object under ``prefix`` as {key: (etag, size)}; raise ListingError on any doubt."""
    call_kwargs = call_kwargs or {}
    objects = {}
    token = None
    while True:
        params = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_SIZE}
        if token:
            params["ContinuationToken"] = token
        counter.list += 1
        started = time.monotonic()
        try:
            page = s3.list_objects_v2(**dict(params, **call_kwargs))
        except Exception as exc:  # pylint: disable=broad-exception-caught
            raise ListingError("listing s3://%s/%s failed on page %d: %s; nothing was changed"
                               % (bucket, prefix, counter.list, _error_text(exc))) from exc
        counter.list_seconds += time.monotonic() - started
        contents = page.get("Contents", []) or []
        if "KeyCount" in page and page["KeyCount"] != len(contents) + len(page.get("CommonPrefixes", []) or []):
            raise ListingError("listing s3://%s/%s page %d says %s keys but carries %d; nothing was changed"
                               % (bucket, prefix, counter.list, page["KeyCount"], len(contents)))
        for item in contents:
            objects[item["Key"]] = (item.get("ETag", ""), int(item.get("Size", 0)))
        if page.get("IsTruncated"):
            token = page.get("NextContinuationToken")
            if not token:
                raise ListingError("listing s3://%s/%s was cut short (truncated without a continuation token); "
                                   "nothing was changed" % (bucket, prefix))
            continue
        return objects


def download_objects(s3, bucket, wanted, counter, workers, call_kwargs=None):
    """{key: bytes} for ``wanted`` {key: (etag, size)}; any failure raises DownloadError."""
    call_kwargs = call_kwargs or {}

    def fetch(key):
        etag, size = wanted[key]
        params = {"Bucket": bucket, "Key": key}
        if etag:
            params["IfMatch"] = etag
        response = s3.get_object(**dict(params, **call_kwargs))
        body = response["Body"].read()
        if len(body) != size:
            raise DownloadError("s3://%s/%s: got %d bytes, the listing said %d" % (bucket, key, len(body), size))
        return body

    results = {}
    if not wanted:
        return results
    counter.get += len(wanted)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(wanted))) as pool:
        futures = dict((pool.submit(fetch, key), key) for key in sorted(wanted))
        errors = []
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            try:
                results[key] = future.result()
            except DownloadError as exc:
                errors.append(str(exc))
            except Exception as exc:  # pylint: disable=broad-exception-caught
                errors.append("s3://%s/%s: %s" % (bucket, key, _error_text(exc)))
    counter.download_seconds += time.monotonic() - started
    if errors:
        raise DownloadError("%d download(s) failed; nothing was changed: %s" % (len(errors), "; ".join(sorted(errors)[:5])))
    return results


def _reject(rejected, obj, user, line, reason):
    rejected.append({"object": obj, "user": user, "line": line, "reason": reason})


def collect(s3, config, state, counter, call_kwargs=None):
    """List, download what changed, parse: (desired {user: [PublicKey]}, new object state, rejected, stats)."""
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
            _reject(rejected, key, name, None, "object is %d bytes, more than max_object_size %d; not downloaded"
                    % (size, config.max_object_size))
            continue
        if size == 0:
            _reject(rejected, key, name, None, "object is empty")
            continue
        candidates[key] = (name, etag, size)
    to_fetch = {}
    for key, (name, etag, size) in candidates.items():
        old = old_objects.get(key)
        if not (old and old.get("etag") == etag and old.get("size") == size and etag):
            to_fetch[key] = (etag, size)
    bodies = download_objects(s3, config.bucket, to_fetch, counter, config.download_workers, call_kwargs)
    desired = {}
    new_objects = {}
    for key, (name, etag, size) in sorted(candidates.items()):
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
            if not keys:
                # Skipped file: the user keeps the keys from the last good version, if any.
                entry["keys"] = old.get("keys", [])
                entry["skipped"] = True
        else:
            entry = old
        for number, reason in entry.get("rejected", []):
            _reject(rejected, key, name, number, reason)
        if entry.get("skipped"):
            _reject(rejected, key, name, None, "no valid key in the file; skipped (previous keys kept: %d)"
                    % len(entry.get("keys", [])))
        new_objects[key] = entry
        parsed = []
        for line in entry.get("keys", []):
            try:
                parsed.append(parse_key_line(line, config.allowed_options))
            except KeyLineError as exc:  # the policy changed since the state was written
                _reject(rejected, key, name, None, "stored key refused by the current policy: %s" % exc)
        if parsed:
            desired[name] = parsed
    stats = {"listed": len(listing), "candidates": len(candidates), "downloaded": len(bodies),
             "reused": len(candidates) - len(bodies)}
    return desired, new_objects, rejected, stats


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
    """One run. Returns a result dict; raises a KeySyncError subclass (nothing changed on S3 trouble)."""
    log = log or (lambda message: None)
    state_path = rooted(config.root, config.state_path)
    lock_path = rooted(config.root, config.lock_path)
    if check_mode:
        return _sync_locked(config, s3, backend, True, call_kwargs, log, state_path)
    with SyncLock(lock_path, config.lock_timeout):
        return _sync_locked(config, s3, backend, False, call_kwargs, log, state_path)


def _sync_locked(config, s3, backend, check_mode, call_kwargs, log, state_path):
    counter = RequestCounter()
    state = load_state(state_path)
    users = backend.list_users()
    managed = [u for u in users.values() if config.marker_group in u.groups and not u.locked]
    desired, new_objects, rejected, stats = collect(s3, config, state, counter, call_kwargs)
    previous = state.get("valid_count", 0) if state.get("bucket") == config.bucket else 0
    if config.mode == PER_USER:
        previous = max(previous, len(managed))
    check_listing_size(len(desired), previous, config)

    shared = config.mode != PER_USER
    if shared:
        plan = plan_shared_user(desired, config, rejected)
        if config.shared_user not in users:
            raise UserBackendError("shared_user %r does not exist on this host; create it first" % config.shared_user)
    else:
        plan = plan_per_user(desired, users, config, state.get("missing", {}), rejected)

    store = KeyFileStore(config)
    result = {
        "changed": False,
        "users_created": [name for name, _uid in plan.create],
        "users_unlocked": list(plan.unlock),
        "users_groups_added": [{"user": n, "groups": g} for n, g in plan.add_groups],
        "users_locked": list(plan.lock),
        "users_removed": list(plan.remove),
        "users_pending_removal": dict(plan.pending_removal),
        "keys_added": [],
        "keys_removed": [],
        "files_written": [],
        "rejected": plan.rejected,
        "objects": stats,
        "requests": counter.as_dict(),
        "check_mode": check_mode,
    }
    before, after = {}, {}
    # Diff: only users whose managed lines change (an unchanged fleet costs no key parsing here).
    for name in sorted(set(plan.keys) | set(plan.remove)):
        info = users.get(name)
        current = _managed_lines(store.read(info), shared) if info is not None else []
        wanted = plan.keys.get(name, [] if name in plan.remove else current)
        if current == wanted and name not in plan.remove:
            continue
        if current or info is not None:
            before[name] = current
        if name not in plan.remove:
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

    try:
        changed = _apply(config, plan, users, backend, store, shared, result, log)
    finally:
        backend.flush()
        store.flush()
    new_state = {
        "version": 1,
        "bucket": config.bucket,
        "prefix": config.prefix,
        "objects": new_objects,
        "valid_count": len(desired),
        "missing": plan.missing,
    }
    if new_state != state:
        save_state(state_path, new_state)
    result["changed"] = changed
    result["requests"] = counter.as_dict()
    result["timings"] = counter.timings()
    return result


def _apply(config, plan, users, backend, store, shared, result, log):
    """Carry out the plan: accounts first, then key files, then locks and removals. True when anything changed."""
    changed = False
    wanted_groups = [config.marker_group] + ([config.sudo_group] if config.sudo_group else [])
    if plan.create or plan.add_groups:
        if backend.ensure_group(config.marker_group):
            changed = True
        if config.sudo_group and not backend.group_exists(config.sudo_group):
            raise UserBackendError("sudo_group %r does not exist on this host" % config.sudo_group)
    for name, uid in plan.create:
        log("creating user %s (uid %d)" % (name, uid))
        backend.create_user(name, uid, wanted_groups, config.shell, "%s/%s" % (config.home_base.rstrip("/"), name))
        changed = True
    for name, groups in plan.add_groups:
        backend.add_groups(name, groups)
        changed = True
    for name in plan.unlock:
        log("unlocking user %s" % name)
        backend.unlock_user(name, config.shell)
        changed = True
    if plan.create:
        users = backend.list_users()
    for name in sorted(plan.keys):
        info = users.get(name)
        if info is None:
            continue
        text = plan.keys[name]
        if shared:
            content = render_shared(store.read(info), text)
        else:
            content = render_user(text)
        try:
            if store.write(info, content):
                result["files_written"].append(name)
                changed = True
        except (ApplyError, OSError) as exc:
            result["rejected"].append({"object": config.prefix + name + ".pub", "user": name, "line": None,
                                       "reason": "authorized_keys not written: %s" % exc})
    for name in plan.lock:
        log("locking user %s (key file gone)" % name)
        backend.lock_user(name)
        changed = True
    for name in plan.remove:
        log("removing user %s (key file gone)" % name)
        store.delete(users[name])
        backend.remove_user(name)
        changed = True
    return changed


def _needs_write(store, info, lines, shared):
    current = store.read(info)
    if shared:
        return current != render_shared(current, lines)
    return current != render_user(lines)

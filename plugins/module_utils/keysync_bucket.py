# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The key sync's gateway to S3: listing, downloads, the team manifest's GET, request counting and error text.

Every call the key sync makes to the S3 client is here, and every one goes through :func:`_s3_request`, the one
place that turns whatever a request raised into an error of the sync. ``keysync_s3`` (the orchestration: plan,
revocations, grants, state) calls only these functions for S3.

The S3 client is any boto3-compatible client; ``call_kwargs`` is added to every call (the module passes
``aws_retry=True`` for amazon.aws's retry wrapper; the host tool relies on botocore's standard retry mode).
Pages and error codes are read with aws_calls.py. Like the other keysync files, this one imports only the
standard library and the collection's module_utils: the bastion_keys role copies it onto the hosts (the list
``__bastion_keys_utils``), where the host tool runs without ansible-core or amazon.aws.
"""

from __future__ import annotations

import concurrent.futures
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_code
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_message
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import http_status
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import pages
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    DownloadError,
    ListingError,
    TeamsError,
)

PAGE_SIZE = 1000


def _error_text(exc):
    code = error_code(exc)
    if code:
        return "%s (HTTP %s): %s" % (code, http_status(exc), error_message(exc) or exc)
    return "%s: %s" % (type(exc).__name__, exc)


class S3RequestError(Exception):
    """One S3 request failed; the message is the AWS error code, HTTP status and message (or the exception's
    type and text). Never escapes this file: the listing turns it into ListingError, a download into that
    object's (and so that user's) failure."""


def _s3_request(request):
    """``request()`` (an S3 call, and for a GET the body read), with any error it raises as S3RequestError."""
    try:
        return request()
    # Deliberately broad, the one such clause of the key sync. The host runs whatever boto3 its distribution
    # ships, and a body is read from urllib3's stream: botocore releases before boto/botocore#2573 (late 2021)
    # let urllib3's ProtocolError out of Body.read() unwrapped, and a botocore bug surfaces as whatever it is
    # (neither is BotoCoreError, ClientError or OSError). Whatever it is, a failed listing must become
    # ListingError (the run records "failed" and the max_sync_age staleness check, with stale_action lock,
    # sees it; an error escaping as itself would skip both, so a host failing that way would never turn
    # stale) and a failed GET must stay with its own user.
    except Exception as exc:  # pylint: disable=broad-exception-caught
        raise S3RequestError(_error_text(exc)) from exc


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


def list_key_objects(s3, bucket, prefix, counter, call_kwargs=None, max_keys=100000):
    """Every key object (``PREFIX<name>.pub``) as {key: (etag, size)}, plus the other objects directly under the
    prefix and one ``PREFIX<folder>/`` entry per folder below it; raise ListingError on any doubt.

    The listing uses the delimiter ``/``: objects nested below the prefix come back as one common prefix per
    folder, not one entry each, so a flood of them costs pages but never counts against ``max_keys``; nor do
    objects with another suffix. More than ``max_keys`` key objects fails closed.
    """
    call_kwargs = call_kwargs or {}
    objects = {}
    seen_tokens = set()
    calls = 0
    pub = 0

    def list_page(**params):
        nonlocal calls
        calls += 1
        counter.list += 1
        started = time.monotonic()
        try:
            page = _s3_request(lambda: s3.list_objects_v2(**params))
        except S3RequestError as exc:
            raise ListingError("listing s3://%s/%s failed on page %d: %s; nothing was changed"
                               % (bucket, prefix, calls, exc)) from exc
        counter.list_seconds += time.monotonic() - started
        return page

    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_SIZE, "Delimiter": "/"}
    listing = pages(list_page, request, "ContinuationToken", reply_token="NextContinuationToken", **call_kwargs)
    for number, page in enumerate(listing, 1):
        contents = page.get("Contents", []) or []
        carried = len(contents) + len(page.get("CommonPrefixes", []) or [])  # KeyCount counts both
        if "KeyCount" in page and page["KeyCount"] != carried:
            raise ListingError("listing s3://%s/%s page %d says %s keys but carries %d; nothing was changed"
                               % (bucket, prefix, number, page["KeyCount"], carried))
        for item in contents:
            objects[item["Key"]] = (item.get("ETag", ""), int(item.get("Size", 0)))
            if item["Key"].endswith(".pub"):
                pub += 1
        for folder in page.get("CommonPrefixes", []) or []:
            objects.setdefault(folder["Prefix"], ("", 0))  # reported as nested, never downloaded
        if pub > max_keys:
            raise ListingError("s3://%s/%s holds more than max_keys %d key objects (PREFIX<name>.pub); refusing to "
                               "apply a listing that large, so no revocation or grant happens until the bucket is "
                               "cleaned up or max_keys raised; nothing was changed" % (bucket, prefix, max_keys))
        if not _listing_continues(page, bucket, prefix, number, seen_tokens):
            break
    return objects


def _listing_continues(page, bucket, prefix, number, seen_tokens):
    """Whether another page follows ``page`` (its token is added to ``seen_tokens``); ListingError when the listing
    was cut short (truncated without a token) or loops (a token seen before)."""
    if not page.get("IsTruncated"):
        return False
    token = page.get("NextContinuationToken")
    if not token:
        raise ListingError("listing s3://%s/%s was cut short (truncated without a continuation token); "
                           "nothing was changed" % (bucket, prefix))
    if token in seen_tokens:
        raise ListingError("listing s3://%s/%s repeated a continuation token on page %d (the listing loops); "
                           "nothing was changed" % (bucket, prefix, number))
    seen_tokens.add(token)
    return True


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
        body = _s3_request(lambda: s3.get_object(**dict(params, **call_kwargs))["Body"].read(size + 1))
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
            except (DownloadError, S3RequestError) as exc:
                errors[key] = "downloading s3://%s/%s failed: %s" % (bucket, key, exc)
    counter.download_seconds += time.monotonic() - started
    return results, errors


def download_teams_manifest(s3, bucket, key, etag, size, counter, call_kwargs=None):
    """The team manifest's bytes, fetched like a key object (``If-Match`` with the listed ETag, exactly the listed
    Size); TeamsError when the GET fails."""
    bodies, errors = download_objects(s3, bucket, {key: (etag, size)}, counter, 1, call_kwargs)
    if errors:
        raise TeamsError("%s; nothing was changed" % "; ".join(errors.values()))
    return bodies[key]

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""ansible-rulebook event source: S3 event notifications on a key bucket, read from an SQS queue."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
import urllib.parse
from typing import Any

DOCUMENTATION = r"""
---
short_description: Receive S3 object events on the SSH key prefix from an SQS queue, bursts coalesced
description:
  - An ansible-rulebook event source that long-polls an SQS queue for Amazon S3 event notifications
    (C(s3:ObjectCreated:*) and C(s3:ObjectRemoved:*)) and turns them into one event per bucket and key
    prefix, so that a rulebook can run the key sync on the hosts of that bucket at once
    (C(extensions/eda/rulebooks/keysync.yml)).
  - "Two formats are read: S3's notification in the message body (a bucket notification whose target is
    the queue), and the same as a JSON string in the C(Message) field of an SNS envelope (a notification
    to an SNS topic the queue subscribes to, without raw message delivery)."
  - The C(s3:TestEvent) that S3 sends when a notification configuration is saved is deleted and produces
    no event. Records for other events (C(ObjectRestore:*), C(LifecycleExpiration:*) and so on), for
    buckets not in O(buckets) and for keys under none of O(prefixes) are dropped. A message that is not
    an S3 notification is logged and, by default, deleted; it never stops the source.
  - "Bursts are coalesced: the first record for a bucket and prefix opens a window of O(coalesce_seconds);
    every record for the same bucket and prefix that arrives within it joins the same event, which is put
    when the window ends. Deleting ten key files in one go gives one event (and one sync run per host),
    not ten. The window adds at most O(coalesce_seconds) to the revocation time."
  - "Delivery is at least once. Messages are deleted only after the event that carries them was handed on
    (C(queue.put) returned). A message that SQS delivers again (its deletion failed, or its visibility
    timeout ran out) whose records were all handed on within the last O(dedupe_seconds) is deleted without
    a new event; one that comes later causes one more sync run, which changes nothing (the sync is
    idempotent). Either way a redelivery does no harm."
  - "AWS errors (throttling, an unreachable endpoint, a queue that does not exist yet, denied access)
    are logged and retried with exponential backoff and jitter, up to O(max_backoff) seconds apart;
    the source keeps polling. Only invalid arguments stop it."
  - "Each event has the key C(s3_key_events) with C(bucket), C(prefix) (the entry of O(prefixes) the keys
    fall under), C(keys) (sorted, URL-decoded), C(removed) and C(created) (keys whose last record in the
    window was a removal or a creation), C(records) (how many records were coalesced), C(first_event_time)
    and C(last_event_time) (S3's C(eventTime)), C(region) and C(format) (C(s3) or C(sns)); and the key
    C(sqs) with the C(message_ids) and C(max_receive_count) (above 1 when SQS delivered one again)."
  - Shares its SQS polling with M(fleetkeeper.aws.asg_lifecycle) (C(extensions/eda/plugins/module_utils/sqs_poller.py)).
    Uses boto3; each call runs in a daemon thread, so a long poll in progress never holds up
    ansible-rulebook's exit.
options:
  queue_url:
    description:
      - URL of the queue. Either this or O(name).
    type: str
  name:
    description:
      - Name of the queue, resolved with GetQueueUrl. Either this or O(queue_url).
    type: str
  queue_owner_aws_account_id:
    description:
      - Account that owns the queue, when it is not the caller's (with O(name)).
    type: str
  region:
    description:
      - AWS region of the queue. Defaults to the region boto3 finds (environment, profile).
    type: str
  profile:
    description:
      - Named profile from the AWS configuration files.
    type: str
  access_key:
    description:
      - AWS access key id. Prefer the environment, a profile or an instance profile.
    type: str
  secret_key:
    description:
      - AWS secret access key.
    type: str
  session_token:
    description:
      - STS session token for temporary credentials.
    type: str
  endpoint_url:
    description:
      - URL to reach SQS at instead of the AWS endpoint (a VPC endpoint, a test endpoint).
    type: str
  wait_time_seconds:
    description:
      - Long-poll duration of each ReceiveMessage, 1 to 20 (SQS's maximum). While a coalescing window is
        open, polls are shortened so that the window closes on time.
    type: int
    default: 20
  max_number_of_messages:
    description:
      - Messages fetched per ReceiveMessage, 1 to 10.
    type: int
    default: 10
  visibility_timeout:
    description:
      - Seconds a received message stays hidden from other consumers (the queue's own setting when
        not given). Keep it above O(coalesce_seconds) plus a few seconds.
    type: int
  prefixes:
    description:
      - Key prefixes the hosts sync (C(bastion_keys_prefix) of the role, C(keys/) by default). A record's
        key is matched to the longest entry it starts with; records under none are dropped.
        An empty string matches every key.
    type: list
    elements: str
    default: [keys/]
  buckets:
    description:
      - Buckets whose records produce events; records for other buckets are dropped. Empty accepts every
        bucket.
    type: list
    elements: str
    default: []
  coalesce_seconds:
    description:
      - Length of the coalescing window, 0 to 60 seconds. V(0) puts one event per received batch of
        messages and bucket/prefix.
    type: float
    default: 2
  dedupe_seconds:
    description:
      - How long records that were handed on are remembered, so that a redelivered message does not cause
        another event. 0 to 86400.
    type: int
    default: 900
  delete_malformed:
    description:
      - Delete messages that are not S3 notifications. V(false) leaves them for the queue's redrive policy.
    type: bool
    default: true
  max_backoff:
    description:
      - Longest wait, in seconds, between retries after an AWS error.
    type: int
    default: 60
"""

EXAMPLES = r"""
- name: Revoke keys as soon as their file is deleted
  hosts: all
  sources:
    - fleetkeeper.aws.s3_key_events:
        queue_url: https://sqs.eu-west-1.amazonaws.com/123456789012/fleetkeeper-keys
        region: eu-west-1
        prefixes: [keys/]
  rules:
    - name: Key files changed
      condition: event.s3_key_events is defined
      action:
        debug:
          msg: "{{ event.s3_key_events.removed }} removed from {{ event.s3_key_events.bucket }}"
"""

TEST_EVENT = "s3:TestEvent"
EVENT_KINDS = {"ObjectCreated": "created", "ObjectRemoved": "removed"}
# S3 bucket names: 3-63 characters of lowercase letters, digits, dots and hyphens (the legacy us-east-1
# names with capitals and underscores are admitted too, as S3 still serves them).
BUCKET = re.compile(r"\A[A-Za-z0-9._-]{3,255}\Z")
MAX_KEY = 1024
MAX_BODY = 262144  # SQS's largest message

LOGGER = logging.getLogger(__name__)


def _load_shared_sqs(source_file: str):
    """extensions/eda/plugins/module_utils/sqs_poller.py, by path (ansible-rulebook runs sources by path)."""
    name = "ansible_collections_fleetkeeper_aws_eda_sqs_poller"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(source_file)), "..", "module_utils", "sqs_poller.py")
        spec = importlib.util.spec_from_file_location(name, os.path.normpath(path))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


# The SQS polling shared with the collection's other sources (extensions/eda/plugins/module_utils).
_SQS = _load_shared_sqs(__file__)


class NotS3Notification(ValueError):
    """The message is not an S3 event notification; the text says why."""


def _decode(text: Any, what: str) -> dict:
    if not isinstance(text, str):
        raise NotS3Notification(f"{what} is not text")
    if len(text) > MAX_BODY:
        raise NotS3Notification(f"{what} is larger than SQS allows")
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise NotS3Notification(f"{what} is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise NotS3Notification(f"{what} is JSON but not an object")
    return document


def _record(raw: Any, fmt: str) -> dict | None:
    """One S3 record as {bucket, key, kind, event, time, sequencer, region, format}; None for other events."""
    if not isinstance(raw, dict) or raw.get("eventSource") != "aws:s3":
        raise NotS3Notification("a record is not from aws:s3")
    event = raw.get("eventName")
    if not isinstance(event, str):
        raise NotS3Notification("a record has no eventName")
    kind = EVENT_KINDS.get(event.split(":", 1)[0])
    if kind is None:
        return None
    s3 = raw.get("s3")
    if not isinstance(s3, dict) or not isinstance(s3.get("bucket"), dict) or not isinstance(s3.get("object"), dict):
        raise NotS3Notification("a record has no s3.bucket and s3.object")
    bucket = s3["bucket"].get("name")
    if not isinstance(bucket, str) or not BUCKET.match(bucket):
        raise NotS3Notification(f"bucket name {str(bucket)[:80]!r} is not valid")
    key = s3["object"].get("key")
    if not isinstance(key, str) or not key:
        raise NotS3Notification("a record has no object key")
    # S3 URL-encodes the key in notifications (a space arrives as '+').
    key = urllib.parse.unquote_plus(key)
    if len(key) > MAX_KEY or any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise NotS3Notification("object key is too long or contains control characters")
    text = {name: raw.get(name) if isinstance(raw.get(name), str) else None for name in ("eventTime", "awsRegion")}
    sequencer = s3["object"].get("sequencer")
    return {"bucket": bucket, "key": key, "kind": kind, "event": event, "time": text["eventTime"],
            "sequencer": sequencer if isinstance(sequencer, str) else None, "region": text["awsRegion"],
            "format": fmt}


def parse_message(body: Any) -> list | None:
    """The created/removed records in one SQS message body.

    None for S3's test event (to be deleted without an event); a list (possibly empty, when every
    record is of another kind) otherwise; NotS3Notification for anything else.
    """
    document = _decode(body, "message body")
    fmt = "s3"
    if document.get("Type") == "Notification" and "Message" in document and "TopicArn" in document:
        document = _decode(document["Message"], "SNS Message")
        fmt = "sns"
    if document.get("Event") == TEST_EVENT:
        return None
    records = document.get("Records")
    if not isinstance(records, list) or not records:
        raise NotS3Notification("neither an S3 event notification nor S3's test event")
    found = []
    for raw in records:
        record = _record(raw, fmt)
        if record is not None:
            found.append(record)
    return found


def record_id(record: dict) -> tuple:
    """What identifies one S3 event across redeliveries of its message."""
    return (record["bucket"], record["key"], record["event"], record["time"], record["sequencer"])


class Settings(_SQS.SqsSettings):  # pylint: disable=too-few-public-methods
    """The validated arguments: the queue and connection ones (shared), then this source's own."""

    source = "s3_key_events"

    def __init__(self, args: dict):
        super().__init__(args)
        prefixes = args.get("prefixes", ["keys/"])
        if not isinstance(prefixes, list) or not prefixes or not all(isinstance(p, str) for p in prefixes):
            raise ValueError("s3_key_events: prefixes must be a non-empty list of strings")
        self.prefixes = sorted(set(prefixes), key=len, reverse=True)
        buckets = args.get("buckets") or []
        if not isinstance(buckets, list) or not all(isinstance(b, str) and BUCKET.match(b) for b in buckets):
            raise ValueError("s3_key_events: buckets must be a list of bucket names")
        self.buckets = set(buckets)
        try:
            self.coalesce = float(args.get("coalesce_seconds", 2))
        except (TypeError, ValueError):
            raise ValueError("s3_key_events: coalesce_seconds must be a number") from None
        if not 0 <= self.coalesce <= 60:
            raise ValueError(f"s3_key_events: coalesce_seconds must be between 0 and 60, got {self.coalesce}")
        self.dedupe = _SQS.argument(args, "dedupe_seconds", 900, 0, 86400, self.source)
        self.delete_malformed = bool(args.get("delete_malformed", True))

    def prefix_of(self, key: str) -> str | None:
        for prefix in self.prefixes:  # longest first
            if key.startswith(prefix):
                return prefix
        return None


class Batch:  # pylint: disable=too-few-public-methods
    """Records for one bucket and prefix waiting for their window to close."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.records = []
        self.messages = {}


class Poller(_SQS.SqsPoller):
    """Receive, coalesce, hand on, delete (receiving, backing off and deleting are the shared SQS poller's)."""

    def __init__(self, settings: Settings, queue: asyncio.Queue, clock=time.monotonic):
        super().__init__(settings)
        self.queue = queue
        self.clock = clock
        self.batches = {}  # (bucket, prefix) -> Batch
        self.waiting = {}  # message id -> [message, set of open batch keys]
        self.seen = {}  # record_id -> when it was handed on

    def _forget_old(self) -> None:
        horizon = self.clock() - self.settings.dedupe
        for rid in [r for r, when in self.seen.items() if when < horizon]:
            del self.seen[rid]

    def accept(self, message: dict) -> bool:
        """File one message's records into batches; True when the message can be deleted at once."""
        mid = message.get("MessageId")
        try:
            records = parse_message(message.get("Body"))
        except NotS3Notification as exc:
            LOGGER.warning("s3_key_events: message %s is not an S3 notification: %s%s", mid, exc,
                           "; deleted" if self.settings.delete_malformed else "; left in the queue")
            return self.settings.delete_malformed
        if records is None:
            LOGGER.info("s3_key_events: deleted test event %s", mid)
            return True
        wanted = []
        for record in records:
            prefix = self.settings.prefix_of(record["key"])
            if prefix is None or (self.settings.buckets and record["bucket"] not in self.settings.buckets):
                continue
            wanted.append((prefix, record))
        if not wanted:
            LOGGER.info("s3_key_events: deleted message %s (no record for the selected buckets and prefixes)", mid)
            return True
        self._forget_old()
        if all(record_id(r) in self.seen for _p, r in wanted):
            LOGGER.info("s3_key_events: deleted redelivered message %s (its records were handed on already)", mid)
            return True
        keys = set()
        for prefix, record in wanted:
            key = (record["bucket"], prefix)
            batch = self.batches.get(key)
            if batch is None:
                batch = self.batches[key] = Batch(self.clock() + self.settings.coalesce)
            if record_id(record) not in {record_id(r) for r in batch.records}:
                batch.records.append(record)
            batch.messages[mid] = message
            keys.add(key)
        if mid in self.waiting:  # the same message again within the window: its newest receipt handle deletes it
            self.waiting[mid][0] = message
            self.waiting[mid][1] |= keys
        else:
            self.waiting[mid] = [message, keys]
        return False

    def event_of(self, key: tuple, batch: Batch) -> dict:
        bucket, prefix = key
        last = {}
        for record in sorted(batch.records, key=lambda r: (r["time"] or "", r["sequencer"] or "")):
            last[record["key"]] = record["kind"]
        times = sorted(r["time"] for r in batch.records if r["time"])
        regions = sorted({r["region"] for r in batch.records if r["region"]})
        return {
            "s3_key_events": {
                "bucket": bucket, "prefix": prefix, "keys": sorted(last),
                "removed": sorted(k for k, kind in last.items() if kind == "removed"),
                "created": sorted(k for k, kind in last.items() if kind == "created"),
                "records": len(batch.records),
                "first_event_time": times[0] if times else None,
                "last_event_time": times[-1] if times else None,
                "region": regions[0] if regions else None,
                "format": batch.records[0]["format"],
            },
            "sqs": {"message_ids": sorted(batch.messages),
                    "max_receive_count": max((_SQS.receive_count(m) or 0 for m in batch.messages.values()),
                                             default=0)},
        }

    async def flush(self, force: bool = False) -> None:
        """Hand on every batch whose window closed, then delete the messages no open batch still holds."""
        now = self.clock()
        done = []
        for key in [k for k, b in self.batches.items() if force or b.deadline <= now]:
            batch = self.batches.pop(key)
            event = self.event_of(key, batch)
            await self.queue.put(event)
            LOGGER.info("s3_key_events: %s: %d record(s) from %d message(s) -> one event (%s)",
                        "s3://%s/%s" % key, len(batch.records), len(batch.messages),
                        ", ".join(event["s3_key_events"]["keys"][:10]))
            handed = self.clock()
            for record in batch.records:
                self.seen[record_id(record)] = handed
            for mid in batch.messages:
                entry = self.waiting.get(mid)
                if entry is None:
                    continue
                entry[1].discard(key)
                if not entry[1]:
                    done.append(self.waiting.pop(mid)[0])
        await self.delete(done)

    def next_wait(self) -> int | None:
        """Long-poll seconds until the earliest open window closes (None: no window open)."""
        if not self.batches:
            return None
        remaining = min(b.deadline for b in self.batches.values()) - self.clock()
        return max(0, math.ceil(remaining))

    async def step(self) -> None:
        """One receive, its messages filed, every closed window flushed."""
        messages = await self.receive(self.next_wait())
        deletable = [m for m in messages if self.accept(m)]
        await self.delete(deletable)
        await self.flush()

    async def run(self) -> None:
        await self.resolve()
        LOGGER.info("s3_key_events: polling %s (prefixes %s, coalescing %g s)", self.queue_url,
                    self.settings.prefixes, self.settings.coalesce)
        while True:
            await self.step()


async def main(queue: asyncio.Queue, args: dict[str, Any]) -> None:
    """Poll the queue for S3 notifications and put one event per bucket, prefix and burst."""
    await Poller(Settings(args), queue).run()


if __name__ == "__main__":

    class _PrintQueue(asyncio.Queue):
        async def put(self, item):
            print(json.dumps(item))  # noqa: T201

    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(_PrintQueue(), {"queue_url": sys.argv[1]}))

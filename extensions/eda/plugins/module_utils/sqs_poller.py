# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""SQS receive / back off / delete shared by the collection's event sources (not a source itself).

ansible-rulebook loads an event source with ``runpy.run_path``, without a package and without the
collections path on ``sys.path``, so a source cannot import this by name: each source loads it from its
path relative to its own file, under the module name ``MODULE_NAME`` (one module object per process,
whichever source loads it first).

Both sources (``asg_lifecycle``, ``s3_key_events``) read SQS the same way: queue URL or name (resolved
with GetQueueUrl), long polls of at most 20 s, every boto3 call in a daemon thread (a long poll in
progress never holds up ansible-rulebook's exit), AWS errors logged and retried with exponential
backoff and jitter (the source keeps polling), messages deleted in batches, a failed deletion logged
(the message is delivered again).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from typing import Any

LOGGER = logging.getLogger(__name__)
MODULE_NAME = "ansible_collections_fleetkeeper_aws_eda_sqs_poller"


def argument(args: dict, key: str, default: Any, low: int | None = None, high: int | None = None,
             source: str = "source") -> Any:
    """An argument, as an integer within [low, high] when a range is given; ValueError names the source."""
    value = args.get(key, default)
    if low is None:
        return value
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key} must be an integer, got {value!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{source}: {key} must be between {low} and {high}, got {value}")
    return value


class SqsSettings:  # pylint: disable=too-few-public-methods,too-many-instance-attributes
    """The queue and connection arguments every SQS source takes, validated."""

    source = "source"

    def __init__(self, args: dict):
        self.queue_url = args.get("queue_url")
        self.name = args.get("name")
        if bool(self.queue_url) == bool(self.name):
            raise ValueError(f"{self.source}: give exactly one of queue_url and name")
        self.owner = args.get("queue_owner_aws_account_id")
        self.wait = argument(args, "wait_time_seconds", 20, 1, 20, self.source)
        self.batch = argument(args, "max_number_of_messages", 10, 1, 10, self.source)
        self.visibility = args.get("visibility_timeout")
        if self.visibility is not None:
            self.visibility = argument(args, "visibility_timeout", None, 0, 43200, self.source)
        self.max_backoff = argument(args, "max_backoff", 60, 1, 3600, self.source)
        names = (("profile", "profile_name"), ("access_key", "aws_access_key_id"),
                 ("secret_key", "aws_secret_access_key"), ("session_token", "aws_session_token"),
                 ("region", "region_name"))
        self.session = {key: args[arg] for arg, key in names if args.get(arg)}
        self.endpoint_url = args.get("endpoint_url") or None


def receive_count(message: dict) -> int | None:
    try:
        return int(message.get("Attributes", {}).get("ApproximateReceiveCount"))
    except (TypeError, ValueError):
        return None


class SqsPoller:
    """Receive and delete; every boto3 call runs in a daemon thread of its own."""

    def __init__(self, settings: SqsSettings):
        import boto3  # pylint: disable=import-outside-toplevel

        self.settings = settings
        self.source = settings.source
        self.client = boto3.session.Session(**settings.session).client("sqs", endpoint_url=settings.endpoint_url)
        self.queue_url = settings.queue_url
        self.failures = 0

    async def call(self, operation: str, **kwargs) -> dict:
        """One boto3 call off the event loop (a daemon thread: a 20 s long poll must not delay shutdown)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(result, error):
            if not future.done():
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)

        def work():
            try:
                outcome = (getattr(self.client, operation)(**kwargs), None)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(settle, *outcome)
            except RuntimeError:  # the loop closed while the call ran
                pass

        threading.Thread(target=work, name=f"{self.source} {operation}", daemon=True).start()
        return await future

    async def backoff(self, what: str, error: Exception) -> None:
        self.failures += 1
        delay = min(self.settings.max_backoff, 2 ** min(self.failures, 10)) * random.uniform(0.5, 1.0)  # noqa: S311
        LOGGER.error("%s: %s failed (%s); retrying in %.1f s", self.source, what, error, delay)
        await asyncio.sleep(delay)

    async def resolve(self) -> None:
        kwargs = {"QueueName": self.settings.name}
        if self.settings.owner:
            kwargs["QueueOwnerAWSAccountId"] = self.settings.owner
        while self.queue_url is None:
            try:
                self.queue_url = (await self.call("get_queue_url", **kwargs))["QueueUrl"]
                self.failures = 0
            except Exception as exc:  # pylint: disable=broad-exception-caught
                # botocore's ClientError/BotoCoreError and whatever the network raises: keep trying.
                await self.backoff(f"GetQueueUrl for {self.settings.name}", exc)

    async def receive(self, wait: int | None = None) -> list:
        """One ReceiveMessage; ``wait`` shortens the long poll (seconds) below the configured one."""
        wait = self.settings.wait if wait is None else max(0, min(wait, self.settings.wait))
        kwargs = {"QueueUrl": self.queue_url, "WaitTimeSeconds": wait,
                  "MaxNumberOfMessages": self.settings.batch,
                  "MessageSystemAttributeNames": ["ApproximateReceiveCount"]}
        if self.settings.visibility is not None:
            kwargs["VisibilityTimeout"] = self.settings.visibility
        try:
            response = await self.call("receive_message", **kwargs)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            await self.backoff("ReceiveMessage", exc)
            return []
        self.failures = 0
        return response.get("Messages", [])

    async def delete(self, messages: list) -> None:
        for start in range(0, len(messages), 10):  # DeleteMessageBatch takes at most 10 entries
            await self._delete_batch(messages[start:start + 10])

    async def _delete_batch(self, messages: list) -> None:
        if not messages:
            return
        entries = [{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(messages)]
        try:
            response = await self.call("delete_message_batch", QueueUrl=self.queue_url, Entries=entries)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            LOGGER.error("%s: DeleteMessageBatch failed (%s): %d message(s) will be delivered again",
                         self.source, exc, len(entries))
            return
        for failed in response.get("Failed", []):
            LOGGER.error("%s: message %s not deleted (%s: %s); it will be delivered again", self.source,
                         messages[int(failed["Id"])].get("MessageId"), failed.get("Code"), failed.get("Message"))

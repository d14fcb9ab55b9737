# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""ansible-rulebook event source: Auto Scaling lifecycle actions read from an SQS queue."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import re
import sys
from typing import Any

DOCUMENTATION = r"""
---
short_description: Receive Auto Scaling lifecycle actions from an SQS queue
description:
  - An ansible-rulebook event source that long-polls an SQS queue for Auto Scaling lifecycle
    notifications and turns each one into one event of a single shape, whatever way it came.
  - "Three formats are read, as AWS documents them: the lifecycle hook's own notification in the
    message body (a hook whose C(NotificationTargetARN) is the queue, or an SNS topic with raw
    message delivery); the same notification as a JSON string in the C(Message) field of an SNS
    envelope (the body is decoded twice); and EventBridge's C(EC2 Instance-launch Lifecycle Action)
    and C(EC2 Instance-terminate Lifecycle Action) events, fields under C(detail)."
  - The C(autoscaling:TEST_NOTIFICATION) that AWS sends when a hook is created is deleted and
    produces no event. A message that is none of these (not JSON, missing or invalid fields, an
    instance id that is not C(i-) and hex) is logged and, by default, deleted; it never stops the source.
  - "Delivery is at least once. A message is deleted only after its event was handed on:
    C(queue.put) returned, so ansible-rulebook holds the event; with O(feedback=true) only after
    ansible-rulebook confirmed that its rule engine took the event (this needs persistence, see
    O(feedback)). Neither means the action (the playbook) finished: a crash of ansible-rulebook after
    that point loses the message. The lifecycle action itself is the real acknowledgement: an instance
    whose event was lost stays in C(Pending:Wait) until a scheduled C(fleetkeeper.aws.provision) run
    (the reconciler) converges it, or its heartbeat timeout ends it with the hook's default result.
    The other way round, a message whose deletion failed or whose visibility timeout ran out is
    delivered again, so a rulebook sees the same event twice: handling must be idempotent per
    C(token) (C(fleetkeeper.aws.provision) completes an action once; a second completion gets
    C(No active Lifecycle Action found), which is final)."
  - "AWS errors (throttling, an unreachable endpoint, a queue that does not exist yet, denied access)
    are logged and retried with exponential backoff and jitter, up to O(max_backoff) seconds apart;
    the source keeps polling. Only invalid arguments stop it."
  - "Each event has the key C(asg_lifecycle) with C(instance_id), C(asg_name), C(hook_name), C(token),
    C(transition) (C(autoscaling:EC2_INSTANCE_LAUNCHING) or C(autoscaling:EC2_INSTANCE_TERMINATING)),
    C(origin), C(destination) (C(EC2), C(AutoScalingGroup) or C(WarmPool): a warm-pool instance's
    launch hook fires twice, first EC2 -> WarmPool, then WarmPool -> AutoScalingGroup; a notification
    without either is EC2 -> AutoScalingGroup for a launch), C(metadata)
    (the hook's NotificationMetadata string or null), C(account_id), C(region) (EventBridge only,
    else null), C(time), C(request_id) and C(format) (C(hook), C(sns) for the hook's notification through SNS, or
    C(eventbridge)); and the key
    C(sqs) with the C(message_id) and the C(receive_count) (above 1 when SQS delivers it again)."
  - Uses boto3 (a dependency of the collection); each call runs in a daemon thread, so a long poll
    in progress never holds up ansible-rulebook's exit.
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
      - Long-poll duration of each ReceiveMessage, 1 to 20 (SQS's maximum).
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
        not given). Keep it above the time from receipt to deletion.
    type: int
  delete_malformed:
    description:
      - Delete messages that are not lifecycle notifications. V(false) leaves them for the queue's
        redrive policy (a dead-letter queue after C(maxReceiveCount) receipts).
    type: bool
    default: true
  transitions:
    description:
      - Lifecycle transitions that produce an event. Notifications for other transitions are deleted.
    type: list
    elements: str
    default: [autoscaling:EC2_INSTANCE_LAUNCHING, autoscaling:EC2_INSTANCE_TERMINATING]
  feedback:
    description:
      - Wait until ansible-rulebook confirms that its rule engine took the event before deleting the
        message. ansible-rulebook accepts this only with persistence enabled (EDA server activations,
        or C(--persistence-id) on the command line).
    type: bool
    default: false
  feedback_timeout:
    description:
      - Seconds to wait for that confirmation. When it does not come, the message is left in the
        queue (it is delivered again) and the source goes on.
    type: int
    default: 120
  max_backoff:
    description:
      - Longest wait, in seconds, between retries after an AWS error.
    type: int
    default: 60
"""

EXAMPLES = r"""
- name: Provision instances the Auto Scaling groups launch
  hosts: all
  sources:
    - fleetkeeper.aws.asg_lifecycle:
        queue_url: https://sqs.eu-west-1.amazonaws.com/123456789012/fleet-lifecycle
        region: eu-west-1
  rules:
    - name: Launched instance
      condition: event.asg_lifecycle.transition == "autoscaling:EC2_INSTANCE_LAUNCHING"
      action:
        debug:
          msg: "{{ event.asg_lifecycle.instance_id }} waits in {{ event.asg_lifecycle.asg_name }}"
"""

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
TEST_NOTIFICATION = "autoscaling:TEST_NOTIFICATION"
EVENTBRIDGE_DETAIL_TYPES = {
    "EC2 Instance-launch Lifecycle Action": LAUNCHING,
    "EC2 Instance-terminate Lifecycle Action": TERMINATING,
}
# Shapes from botocore's autoscaling model: InstanceId is XmlStringMaxLen19 (EC2's ids are
# i- and 8 or 17 hex digits), LifecycleActionToken is 36 characters, LifecycleHookName matches
# [A-Za-z0-9\-_\/]+ (1-255), AutoScalingGroupName is XmlStringMaxLen255. The instance id ends up
# in ansible-playbook's --limit and extra vars: nothing looser than this passes.
INSTANCE_ID = re.compile(r"\Ai-(?:[0-9a-f]{8}|[0-9a-f]{17})\Z")
TOKEN = re.compile(r"\A[0-9A-Za-z-]{36}\Z")
HOOK_NAME = re.compile(r"\A[A-Za-z0-9\-_/]{1,255}\Z")
PLACES = {"EC2", "AutoScalingGroup", "WarmPool"}
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


class NotLifecycleMessage(ValueError):
    """The message is not an Auto Scaling lifecycle notification; the text says why."""


def _printable(value: Any, field: str, limit: int = 255) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise NotLifecycleMessage(f"{field} must be a string of 1 to {limit} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise NotLifecycleMessage(f"{field} contains control characters")
    return value


def _optional_text(value: Any, field: str, limit: int = 1023) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise NotLifecycleMessage(f"{field} must be a string of at most {limit} characters")
    return value


def _decode(text: Any, what: str) -> dict:
    if not isinstance(text, str):
        raise NotLifecycleMessage(f"{what} is not text")
    if len(text) > MAX_BODY:
        raise NotLifecycleMessage(f"{what} is larger than SQS allows")
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise NotLifecycleMessage(f"{what} is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise NotLifecycleMessage(f"{what} is JSON but not an object")
    return document


def _action(fields: dict, fmt: str, region: str | None = None, account: Any = None) -> dict:
    """The normalised event from the hook notification's field names (also EventBridge's ``detail``)."""
    transition = fields.get("LifecycleTransition")
    if transition not in (LAUNCHING, TERMINATING):
        raise NotLifecycleMessage(f"unknown LifecycleTransition {str(transition)[:60]!r}")
    instance_id = fields.get("EC2InstanceId")
    if not isinstance(instance_id, str) or not INSTANCE_ID.match(instance_id):
        raise NotLifecycleMessage(f"EC2InstanceId {str(instance_id)[:40]!r} is not an EC2 instance id")
    token = fields.get("LifecycleActionToken")
    if not isinstance(token, str) or not TOKEN.match(token):
        raise NotLifecycleMessage("LifecycleActionToken is missing or not a token")
    hook = fields.get("LifecycleHookName")
    if not isinstance(hook, str) or not HOOK_NAME.match(hook):
        raise NotLifecycleMessage("LifecycleHookName is missing or invalid")
    places = {}
    for key in ("Origin", "Destination"):
        value = fields.get(key)
        if value is not None and value not in PLACES:
            raise NotLifecycleMessage(f"{key} {str(value)[:40]!r} is not one of {sorted(PLACES)}")
        places[key] = value
    if places["Origin"] is None and places["Destination"] is None:
        # Notifications from before warm pools carry neither: the only path then was EC2 <-> group.
        places = {"Origin": "EC2", "Destination": "AutoScalingGroup"}
        if transition == TERMINATING:
            places = {"Origin": "AutoScalingGroup", "Destination": "EC2"}
    account_id = fields.get("AccountId", account)
    return {
        "instance_id": instance_id,
        "asg_name": _printable(fields.get("AutoScalingGroupName"), "AutoScalingGroupName"),
        "hook_name": hook,
        "token": token,
        "transition": transition,
        "origin": places["Origin"],
        "destination": places["Destination"],
        "metadata": _optional_text(fields.get("NotificationMetadata"), "NotificationMetadata"),
        "account_id": account_id if isinstance(account_id, str) and account_id.isdigit() else None,
        "region": region,
        "time": _optional_text(fields.get("Time"), "Time", 64),
        "request_id": _optional_text(fields.get("RequestId"), "RequestId", 64),
        "format": fmt,
    }


def parse_message(body: Any) -> dict | None:
    """The normalised lifecycle action in one SQS message body.

    None for the hook's test notification (to be deleted without an event);
    NotLifecycleMessage for anything that is not a lifecycle notification.
    """
    document = _decode(body, "message body")
    fmt = "hook"
    if document.get("Type") == "Notification" and "Message" in document and "TopicArn" in document:
        document = _decode(document["Message"], "SNS Message")
        fmt = "sns"
    if document.get("Event") == TEST_NOTIFICATION:
        return None
    if "detail-type" in document:
        if document.get("source") != "aws.autoscaling":
            raise NotLifecycleMessage(f"EventBridge event from {str(document.get('source'))[:60]!r}")
        transition = EVENTBRIDGE_DETAIL_TYPES.get(document["detail-type"])
        if transition is None:
            raise NotLifecycleMessage(f"EventBridge detail-type {str(document['detail-type'])[:60]!r}")
        detail = document.get("detail")
        if not isinstance(detail, dict):
            raise NotLifecycleMessage("EventBridge event without a detail object")
        if detail.get("LifecycleTransition", transition) != transition:
            raise NotLifecycleMessage("EventBridge detail-type and LifecycleTransition disagree")
        region = document.get("region")
        region = region if isinstance(region, str) and re.match(r"\A[a-z0-9-]{1,32}\Z", region) else None
        return _action({"Time": document.get("time"), **detail}, "eventbridge",
                       region=region, account=document.get("account"))
    if "LifecycleTransition" not in document:
        raise NotLifecycleMessage("neither a lifecycle notification nor an EventBridge event")
    return _action(document, fmt)


class Settings(_SQS.SqsSettings):  # pylint: disable=too-few-public-methods
    """The validated arguments: the queue and connection ones (shared), then this source's own."""

    source = "asg_lifecycle"

    def __init__(self, args: dict):
        super().__init__(args)
        self.delete_malformed = bool(args.get("delete_malformed", True))
        transitions = args.get("transitions", [LAUNCHING, TERMINATING])
        if not isinstance(transitions, list) or not set(transitions) <= {LAUNCHING, TERMINATING}:
            raise ValueError(f"asg_lifecycle: transitions must be a list of {LAUNCHING} and {TERMINATING}")
        self.transitions = set(transitions)
        self.feedback_queue = args.get("eda_feedback_queue") if args.get("feedback") else None
        if args.get("feedback") and self.feedback_queue is None:
            raise ValueError("asg_lifecycle: feedback is on but ansible-rulebook passed no feedback queue "
                             "(it needs persistence: --persistence-id, or an EDA server activation)")
        self.feedback_timeout = _SQS.argument(args, "feedback_timeout", 120, 1, 86400, self.source)


class Poller(_SQS.SqsPoller):
    """Receive, hand on, delete (receiving, backing off and deleting are the shared SQS poller's)."""

    def __init__(self, settings: Settings, queue: asyncio.Queue):
        super().__init__(settings)
        self.queue = queue

    async def hand_on(self, message: dict, action: dict) -> bool:
        await self.queue.put({"asg_lifecycle": action,
                              "sqs": {"message_id": message.get("MessageId"),
                                      "receive_count": _SQS.receive_count(message)}})
        if self.settings.feedback_queue is None:
            return True
        try:
            await asyncio.wait_for(self.settings.feedback_queue.get(), timeout=self.settings.feedback_timeout)
        except asyncio.TimeoutError:
            LOGGER.error("asg_lifecycle: no feedback from ansible-rulebook for message %s within %d s; "
                         "leaving it in the queue", message.get("MessageId"), self.settings.feedback_timeout)
            return False
        return True

    async def handle(self, messages: list) -> None:
        done = []
        for message in messages:
            try:
                action = parse_message(message.get("Body"))
            except NotLifecycleMessage as exc:
                LOGGER.warning("asg_lifecycle: message %s is not a lifecycle notification: %s%s",
                               message.get("MessageId"), exc,
                               "; deleted" if self.settings.delete_malformed else "; left in the queue")
                if self.settings.delete_malformed:
                    done.append(message)
                continue
            if action is None:
                LOGGER.info("asg_lifecycle: deleted test notification %s", message.get("MessageId"))
            elif action["transition"] not in self.settings.transitions:
                LOGGER.info("asg_lifecycle: deleted %s for %s (not selected)", action["transition"],
                            action["instance_id"])
            elif not await self.hand_on(message, action):
                continue
            done.append(message)
        await self.delete(done)

    async def run(self) -> None:
        await self.resolve()
        LOGGER.info("asg_lifecycle: polling %s", self.queue_url)
        while True:
            messages = await self.receive()
            if messages:
                await self.handle(messages)


async def main(queue: asyncio.Queue, args: dict[str, Any]) -> None:
    """Poll the queue for lifecycle notifications and put one event per lifecycle action."""
    await Poller(Settings(args), queue).run()


if __name__ == "__main__":

    class _PrintQueue(asyncio.Queue):
        async def put(self, item):
            print(json.dumps(item))  # noqa: T201

    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(_PrintQueue(), {"queue_url": sys.argv[1]}))

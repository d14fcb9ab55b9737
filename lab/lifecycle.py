# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Auto Scaling launch lifecycle actions, emulated in the test endpoint's proxy.

moto 5 stores lifecycle hooks (PutLifecycleHook, DescribeLifecycleHooks,
DeleteLifecycleHook) but never holds an instance in ``Pending:Wait``, drops a
hook's notification target, role and metadata (DescribeLifecycleHooks answers
with fixed placeholders), sends no notification and has neither
CompleteLifecycleAction nor RecordLifecycleActionHeartbeat. ``LifecycleEmulation``
adds exactly these behaviours, in front of moto, for hooks whose transition is
``autoscaling:EC2_INSTANCE_LAUNCHING``:

* **Holding.** An instance that appears in an Auto Scaling group after a launch
  hook was put on it (scale-out, replacement) gets one lifecycle action per
  launch hook, with a fresh ``LifecycleActionToken``. While any of its actions is
  open, DescribeAutoScalingGroups and DescribeAutoScalingInstances show its
  ``LifecycleState`` as ``Pending:Wait`` (moto says ``InService``). Instances that
  were in the group before the hook are left alone, as AWS does.
* **Notification.** When the hook names a notification target, the hook's own
  message (``Origin``/``Destination``, ``LifecycleHookName``,
  ``LifecycleActionToken``, ``AutoScalingGroupName``, ``EC2InstanceId``,
  ``LifecycleTransition``, ``NotificationMetadata`` when set, ``Service``,
  ``Time``, ``RequestId``, ``AccountId``) is sent to it: SQS SendMessage into
  moto's queue, or SNS Publish to moto's topic (which wraps it in ``Message``).
  Putting a hook with a new target first sends ``autoscaling:TEST_NOTIFICATION``;
  a target that cannot receive it (no such queue, a FIFO queue) fails the
  PutLifecycleHook with AWS's ValidationError, as AWS does. EventBridge needs no
  target and is not emulated.
* **CompleteLifecycleAction** (by ``LifecycleActionToken`` or ``InstanceId``):
  ``CONTINUE`` closes the action (the instance is ``InService`` once all its
  actions are closed); ``ABANDON`` terminates the instance through moto's
  TerminateInstanceInAutoScalingGroup without decrementing the desired capacity,
  so moto launches a replacement, which is held again. No open action:
  ``ValidationError`` "No active Lifecycle Action found with instance ID ..."
  (or "... with token ..."), HTTP 400, as AWS answers.
* **RecordLifecycleActionHeartbeat** restarts the action's heartbeat timer.
* **Timeout.** An action whose heartbeat timer ran out, or that reached the
  global timeout (min(48 h, 100 x heartbeat timeout)), is completed with the
  hook's default result. Timers are checked at each Auto Scaling request, which
  is when a client can observe them. ``time_scale`` (tests only, default 1)
  multiplies every timeout so that a test can use AWS's 30 s minimum and still
  run in seconds.
* DescribeLifecycleHooks answers with the target, role and metadata that were
  put (moto's placeholders removed); DeleteLifecycleHook abandons the hook's open
  actions, as AWS does for launch hooks.

Every made-up response is checked against botocore's service model in
``tests/unit/lab/test_awsemu_lifecycle.py``. Not emulated: terminate hooks, warm
pools, ``LifecycleHookSpecificationList`` on CreateAutoScalingGroup, partial
updates of an existing hook (moto replaces it whole) and IAM checks of the
role.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
NS = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
MAX_GLOBAL_TIMEOUT = 172800
ACCOUNT_ID = "123456789012"  # moto's default account

# The request members the emulation reads, per operation (checked against botocore's model).
READS = {
    "CompleteLifecycleAction": ("AutoScalingGroupName", "LifecycleHookName", "LifecycleActionToken", "InstanceId",
                                "LifecycleActionResult"),
    "RecordLifecycleActionHeartbeat": ("AutoScalingGroupName", "LifecycleHookName", "LifecycleActionToken",
                                       "InstanceId"),
    "PutLifecycleHook": ("AutoScalingGroupName", "LifecycleHookName", "LifecycleTransition", "HeartbeatTimeout",
                         "DefaultResult", "NotificationTargetARN", "RoleARN", "NotificationMetadata"),
    "DeleteLifecycleHook": ("AutoScalingGroupName", "LifecycleHookName"),
}
# The members of the hook's own notification (AWS Auto Scaling user guide, "Notification message example").
LAUNCH_MESSAGE_KEYS = ("Origin", "Destination", "LifecycleHookName", "AccountId", "RequestId", "LifecycleTransition",
                       "AutoScalingGroupName", "Service", "Time", "EC2InstanceId", "LifecycleActionToken")
TEST_MESSAGE_KEYS = ("AccountId", "RequestId", "AutoScalingGroupARN", "AutoScalingGroupName", "Service", "Event", "Time")


def query_params(path: str, body: bytes) -> dict:
    """The flat parameters of a query-protocol request (``Key.member.1=...``)."""
    params = {}
    for source in (urllib.parse.urlsplit(path).query, body.decode("utf-8", "replace") if body else ""):
        for key, values in urllib.parse.parse_qs(source, keep_blank_values=True).items():
            params[key] = values[0]
    return params


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def error_response(code: str, message: str, status: int = 400) -> tuple[int, bytes]:
    body = (
        f'<ErrorResponse xmlns="{NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{_escape(message)}</Message></Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    )
    return status, body.encode()


def empty_response(operation: str) -> tuple[int, bytes]:
    body = (
        f'<{operation}Response xmlns="{NS}"><{operation}Result/>'
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></{operation}Response>"
    )
    return 200, body.encode()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Hook:
    """A launch hook as put through the proxy (what moto forgets)."""

    def __init__(self, region, group, name, params):
        self.region = region
        self.group = group
        self.name = name
        self.heartbeat_timeout = int(params.get("HeartbeatTimeout") or 3600)
        self.default_result = params.get("DefaultResult") or "ABANDON"
        self.target = params.get("NotificationTargetARN") or None
        self.role = params.get("RoleARN") or None
        self.metadata = params.get("NotificationMetadata")

    @property
    def global_timeout(self) -> int:
        return min(MAX_GLOBAL_TIMEOUT, 100 * self.heartbeat_timeout)


class Action:
    """One open lifecycle action: an instance held by one hook."""

    def __init__(self, hook: Hook, instance_id: str, scale: float):
        self.hook = hook
        self.instance_id = instance_id
        self.token = str(uuid.uuid4())
        now = time.monotonic()
        self.started = now
        self.heartbeat_deadline = now + hook.heartbeat_timeout * scale
        self.global_deadline = now + hook.global_timeout * scale

    def as_dict(self) -> dict:
        return {
            "AutoScalingGroupName": self.hook.group,
            "LifecycleHookName": self.hook.name,
            "EC2InstanceId": self.instance_id,
            "LifecycleActionToken": self.token,
            "Region": self.hook.region,
        }


class LifecycleEmulation:
    """Lifecycle actions for the proxy; ``client_factory(service, region)`` reaches moto directly."""

    def __init__(self, client_factory):
        self._client = client_factory
        self.lock = threading.RLock()
        self.time_scale = 1.0
        self.reset()

    # --- state -----------------------------------------------------------
    def reset(self) -> None:
        with self.lock:
            self.hooks: dict = {}  # (region, group, name) -> Hook
            self.open: dict = {}  # token -> Action
            self.seen: set = set()  # (region, instance id) already judged
            self.history: list = []  # closed actions: dicts with Result and How
            self.notifications: list = []  # (target arn, message dict) sent
            self.time_scale = 1.0

    def actions(self) -> list:
        """The open actions (for tests and the demo)."""
        with self.lock:
            return [a.as_dict() for a in self.open.values()]

    def active(self) -> bool:
        return bool(self.hooks) or bool(self.open)

    # --- proxy entry points ----------------------------------------------
    def before(self, region: str, operation: str, params: dict):
        """A made-up response (status, body) for the operations moto lacks, else None."""
        with self.lock:
            self._expire()
            if operation == "CompleteLifecycleAction":
                return self._complete_request(region, params)
            if operation == "RecordLifecycleActionHeartbeat":
                return self._heartbeat_request(region, params)
            if operation == "PutLifecycleHook":
                return self._check_target(region, params)
        return None

    def after(self, region: str, operation: str, params: dict, status: int, payload: bytes) -> bytes:
        """Record what moto accepted, hold new instances and rewrite what moto cannot know."""
        if status != 200:
            return payload
        with self.lock:
            if operation == "PutLifecycleHook":
                self._sync(region, force=True)  # instances already there are not held
                self._put_hook(region, params)
                return payload
            if operation == "DeleteLifecycleHook":
                self._delete_hook(region, params)
            if not self.active():
                return payload
            self._sync(region)
            if operation in ("DescribeAutoScalingGroups", "DescribeAutoScalingInstances"):
                return self._rewrite_states(payload)
            if operation == "DescribeLifecycleHooks":
                return self._rewrite_hooks(region, payload)
        return payload

    # --- hooks -----------------------------------------------------------
    def _put_hook(self, region, params) -> None:
        group, name = params.get("AutoScalingGroupName"), params.get("LifecycleHookName")
        key = (region, group, name)
        transition = params.get("LifecycleTransition")
        if transition and transition != LAUNCHING:
            self.hooks.pop(key, None)
            return
        previous = self.hooks.get(key)
        hook = Hook(region, group, name, params)
        self.hooks[key] = hook
        if previous is not None:
            for action in self.open.values():
                if action.hook is previous:
                    action.hook = hook

    def _check_target(self, region, params):
        """AWS sends TEST_NOTIFICATION to a new target and refuses the hook when that fails."""
        target = params.get("NotificationTargetARN")
        if not target:
            return None
        previous = self.hooks.get((region, params.get("AutoScalingGroupName"), params.get("LifecycleHookName")))
        if previous is not None and previous.target == target:
            return None
        message = {
            "AccountId": ACCOUNT_ID,
            "RequestId": str(uuid.uuid4()),
            "AutoScalingGroupARN": (
                f"arn:aws:autoscaling:{region}:{ACCOUNT_ID}:autoScalingGroup:{uuid.uuid4()}:"
                f"autoScalingGroupName/{params.get('AutoScalingGroupName')}"
            ),
            "AutoScalingGroupName": params.get("AutoScalingGroupName"),
            "Service": "AWS Auto Scaling",
            "Event": "autoscaling:TEST_NOTIFICATION",
            "Time": _now_iso(),
        }
        if not self._notify(target, message, "Auto Scaling: test notification"):
            return error_response(
                "ValidationError",
                f"Unable to publish test message to notification target {target} using IAM role "
                f"{params.get('RoleARN')}. Please check your target and role configuration and try to put "
                "lifecycle hook again.",
            )
        return None

    def _delete_hook(self, region, params) -> None:
        hook = self.hooks.pop((region, params.get("AutoScalingGroupName"), params.get("LifecycleHookName")), None)
        if hook is None:
            return
        for action in [a for a in self.open.values() if a.hook is hook]:
            self._close(action, "ABANDON", "hook deleted")

    # --- instances -------------------------------------------------------
    def _groups(self, region) -> list:
        client = self._client("autoscaling", region)
        groups = []
        for page in client.get_paginator("describe_auto_scaling_groups").paginate():
            groups.extend(page["AutoScalingGroups"])
        return groups

    def _sync(self, region, force=False) -> None:
        """Hold instances that appeared in a hooked group; forget actions of vanished instances."""
        if not force and not any(h.region == region for h in self.hooks.values()):
            return
        present = set()
        for group in self._groups(region):
            hooks = [h for h in self.hooks.values() if h.region == region and h.group == group["AutoScalingGroupName"]]
            for instance in group.get("Instances", []):
                key = (region, instance["InstanceId"])
                present.add(instance["InstanceId"])
                if key in self.seen:
                    continue
                self.seen.add(key)
                for hook in hooks:
                    self._open(hook, instance["InstanceId"])
        for action in [a for a in self.open.values() if a.hook.region == region and a.instance_id not in present]:
            self.open.pop(action.token, None)
            self.history.append(dict(action.as_dict(), Result=None, How="instance left the group"))

    def _open(self, hook: Hook, instance_id: str) -> None:
        action = Action(hook, instance_id, self.time_scale)
        self.open[action.token] = action
        if hook.target:
            message = {
                "Origin": "EC2",
                "Destination": "AutoScalingGroup",
                "LifecycleHookName": hook.name,
                "AccountId": ACCOUNT_ID,
                "RequestId": str(uuid.uuid4()),
                "LifecycleTransition": LAUNCHING,
                "AutoScalingGroupName": hook.group,
                "Service": "AWS Auto Scaling",
                "Time": _now_iso(),
                "EC2InstanceId": instance_id,
                "LifecycleActionToken": action.token,
            }
            if hook.metadata is not None:
                message["NotificationMetadata"] = hook.metadata
            self._notify(hook.target, message, f"Auto Scaling:  Lifecycle action 'LAUNCHING' for instance {instance_id}")

    def _notify(self, target: str, message: dict, subject: str) -> bool:
        parts = target.split(":")
        if len(parts) < 6 or parts[0] != "arn":
            return False
        service, region, account, name = parts[2], parts[3], parts[4], parts[5]
        body = json.dumps(message)
        try:
            if service == "sqs":
                if name.endswith(".fifo"):
                    return False  # AWS refuses FIFO queues as hook targets
                sqs = self._client("sqs", region)
                url = sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]
                sqs.send_message(QueueUrl=url, MessageBody=body)
            elif service == "sns":
                self._client("sns", region).publish(TopicArn=target, Message=body, Subject=subject[:99])
            else:
                return False
        except Exception:  # pylint: disable=broad-exception-caught  # any moto error: target unusable
            return False
        self.notifications.append((target, message))
        return True

    # --- actions ---------------------------------------------------------
    def _find(self, region, params):
        token, instance_id = params.get("LifecycleActionToken"), params.get("InstanceId")
        group, name = params.get("AutoScalingGroupName"), params.get("LifecycleHookName")
        for action in self.open.values():
            hook = action.hook
            if (hook.region, hook.group, hook.name) != (region, group, name):
                continue
            if token and action.token == token:
                return action
            if not token and instance_id and action.instance_id == instance_id:
                return action
        return None

    def _missing(self, params):
        for name in ("AutoScalingGroupName", "LifecycleHookName"):
            if not params.get(name):
                return error_response("ValidationError", f"1 validation error detected: Value null at '{name}' "
                                      "failed to satisfy constraint: Member must not be null")
        if not params.get("LifecycleActionToken") and not params.get("InstanceId"):
            return error_response("ValidationError", "Either LifecycleActionToken or InstanceId must be specified")
        return None

    def _not_found(self, params):
        if params.get("LifecycleActionToken"):
            return error_response(
                "ValidationError", f"No active Lifecycle Action found with token {params['LifecycleActionToken']}")
        return error_response("ValidationError", f"No active Lifecycle Action found with instance ID {params['InstanceId']}")

    def _complete_request(self, region, params):
        problem = self._missing(params)
        if problem:
            return problem
        result = params.get("LifecycleActionResult")
        if result not in ("CONTINUE", "ABANDON"):
            return error_response("ValidationError", f"Invalid lifecycle action result {result!r}: use CONTINUE or ABANDON")
        action = self._find(region, params)
        if action is None:
            return self._not_found(params)
        self._close(action, result, "CompleteLifecycleAction")
        return empty_response("CompleteLifecycleAction")

    def _heartbeat_request(self, region, params):
        problem = self._missing(params)
        if problem:
            return problem
        action = self._find(region, params)
        if action is None:
            return self._not_found(params)
        action.heartbeat_deadline = min(action.global_deadline,
                                        time.monotonic() + action.hook.heartbeat_timeout * self.time_scale)
        return empty_response("RecordLifecycleActionHeartbeat")

    def _expire(self) -> None:
        now = time.monotonic()
        for action in [a for a in self.open.values() if now >= min(a.heartbeat_deadline, a.global_deadline)]:
            self._close(action, action.hook.default_result, "timeout")

    def _close(self, action: Action, result: str, how: str) -> None:
        self.open.pop(action.token, None)
        self.history.append(dict(action.as_dict(), Result=result, How=how, At=time.time()))
        if result == "ABANDON":
            for other in [a for a in self.open.values() if a.instance_id == action.instance_id]:
                self.open.pop(other.token, None)
            client = self._client("autoscaling", action.hook.region)
            try:
                client.terminate_instance_in_auto_scaling_group(
                    InstanceId=action.instance_id, ShouldDecrementDesiredCapacity=False)
            except Exception:  # pylint: disable=broad-exception-caught  # already gone from the group
                return
            self._sync(action.hook.region)  # hold the replacement at once

    # --- response rewriting ----------------------------------------------
    def _pending(self) -> set:
        return {a.instance_id for a in self.open.values()}

    def _rewrite_states(self, payload: bytes) -> bytes:
        pending = self._pending()
        if not pending:
            return payload
        root = ET.fromstring(payload)
        changed = False
        for member in root.iter(f"{{{NS}}}member"):
            instance_id = member.findtext(f"{{{NS}}}InstanceId")
            state = member.find(f"{{{NS}}}LifecycleState")
            if instance_id in pending and state is not None:
                state.text = "Pending:Wait"
                changed = True
        return _serialise(root) if changed else payload

    def _rewrite_hooks(self, region, payload: bytes) -> bytes:
        root = ET.fromstring(payload)
        for member in root.iter(f"{{{NS}}}member"):
            name = member.findtext(f"{{{NS}}}LifecycleHookName")
            group = member.findtext(f"{{{NS}}}AutoScalingGroupName")
            if name is None or group is None:
                continue
            hook = self.hooks.get((region, group, name))
            values = {
                "NotificationTargetARN": hook.target if hook else None,
                "RoleARN": hook.role if hook else None,
                "NotificationMetadata": hook.metadata if hook else None,
            }
            for tag, value in values.items():
                node = member.find(f"{{{NS}}}{tag}")
                if value is None:
                    if node is not None:
                        member.remove(node)
                    continue
                if node is None:
                    node = ET.SubElement(member, f"{{{NS}}}{tag}")
                node.text = value
            if hook is not None:
                node = member.find(f"{{{NS}}}GlobalTimeout")
                if node is not None:
                    node.text = str(hook.global_timeout)
        return _serialise(root)


def _serialise(root) -> bytes:
    ET.register_namespace("", NS)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)

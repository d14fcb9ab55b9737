# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Auto Scaling launch lifecycle hooks and actions: the logic behind ``asg_lifecycle_hook`` and
``asg_lifecycle_action``.

* :func:`desired_hook` / :func:`hook_changes` decide, from plain dictionaries as
  botocore returns them, whether a group's hook must be put (every managed field
  is compared, including a notification target, role or metadata that must go).
* :class:`HookManager` applies that to many groups, each failure confined to its
  group.
* :class:`ActionRunner` completes, or records heartbeats for, many lifecycle
  actions concurrently with one result per instance. ``ValidationError: No
  active Lifecycle Action found`` is final: the action was completed already (or
  timed out), it is reported as such and never retried. Contention
  (``ResourceContention``) and throttling are retried by the client's retry
  decorator (see :data:`RETRY_CODES`).

Both make their Auto Scaling calls through a :class:`LifecycleGateway`
(``lifecycle_gateway.py``), usually over a boto3 client wrapped by amazon.aws's
``AWSRetry``; nothing here takes an AnsibleModule.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

try:
    import botocore.exceptions

    AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
except ImportError:  # AnsibleAWSModule reports the missing SDK; the inventory plugin fails on its own import
    AWS_ERRORS = ()

from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_code
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_message
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle_gateway import LAUNCHING
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle_gateway import LifecycleGateway

RESULTS = ("CONTINUE", "ABANDON")
PENDING_WAIT = "Pending:Wait"
RETRY_CODES = ["ResourceContention"]  # besides AWSRetry's throttling and 5xx codes
HEARTBEAT_MIN, HEARTBEAT_MAX = 30, 7200

# Statuses of one instance in ActionRunner's results.
COMPLETED = "completed"
HEARTBEAT = "heartbeat"
ALREADY_COMPLETED = "already_completed"
NOT_PENDING = "not_pending"
WOULD_COMPLETE = "would_complete"
WOULD_HEARTBEAT = "would_heartbeat"
FAILED = "failed"
TOKEN_MISMATCH = "token_mismatch"
CHANGING = (COMPLETED, HEARTBEAT, WOULD_COMPLETE, WOULD_HEARTBEAT)
FAILING = (FAILED, TOKEN_MISMATCH)


class LifecycleError(Exception):
    """Bad input: the message says what to fix."""


def describe_error(exc):
    code = error_code(exc)
    message = error_message(exc) or str(exc)
    return f"{code}: {message}" if code else message


# --------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------


def launch_hook_names(autoscaling, group_name, **call_kwargs):
    """Sorted names of the group's launch (``EC2_INSTANCE_LAUNCHING``) hooks: those a Pending:Wait instance of
    the group can be held by. ``call_kwargs`` goes to the call (``aws_retry=True`` on amazon.aws's retrying
    clients); errors are the caller's to handle. DescribeLifecycleHooks is not paginated."""
    return LifecycleGateway(autoscaling, call_kwargs).launch_hook_names(group_name)


def validate_hook_options(heartbeat_timeout, default_result, target_arn, role_arn):
    if not HEARTBEAT_MIN <= heartbeat_timeout <= HEARTBEAT_MAX:
        raise LifecycleError(
            f"heartbeat_timeout must be between {HEARTBEAT_MIN} and {HEARTBEAT_MAX} seconds, not {heartbeat_timeout}")
    if default_result not in RESULTS:
        raise LifecycleError(f"default_result must be CONTINUE or ABANDON, not {default_result!r}")
    if target_arn:
        parts = target_arn.split(":")
        if len(parts) < 6 or parts[0] != "arn" or parts[2] not in ("sqs", "sns"):
            raise LifecycleError(
                f"notification_target_arn {target_arn!r} is not an SQS queue or SNS topic ARN "
                "(for EventBridge, leave it unset: Auto Scaling sends its events there without a target)")
        if parts[2] == "sqs" and parts[5].endswith(".fifo"):
            raise LifecycleError(f"notification_target_arn {target_arn!r} is a FIFO queue: Auto Scaling cannot "
                                 "notify FIFO queues, use a standard queue")
        if not role_arn:
            raise LifecycleError("role_arn is required with notification_target_arn: Auto Scaling assumes it "
                                 "to publish to the target")
    elif role_arn:
        raise LifecycleError("role_arn is only used with notification_target_arn: set both or neither")


def desired_hook(group_name, hook_name, heartbeat_timeout, default_result, target_arn=None, role_arn=None,
                 metadata=None):
    """The hook as DescribeLifecycleHooks would show it once put (absent optional fields left out)."""
    hook = {
        "AutoScalingGroupName": group_name,
        "LifecycleHookName": hook_name,
        "LifecycleTransition": LAUNCHING,
        "HeartbeatTimeout": heartbeat_timeout,
        "DefaultResult": default_result,
    }
    for key, value in (("NotificationTargetARN", target_arn), ("RoleARN", role_arn),
                       ("NotificationMetadata", metadata)):
        if value:
            hook[key] = value
    return hook


MANAGED_FIELDS = ("LifecycleTransition", "HeartbeatTimeout", "DefaultResult", "NotificationTargetARN", "RoleARN",
                  "NotificationMetadata")


def hook_view(hook):
    """The managed fields of a hook (None: no hook)."""
    if hook is None:
        return None
    return {key: hook[key] for key in MANAGED_FIELDS if hook.get(key) not in (None, "")}


def hook_changes(existing, desired):
    """Sorted names of the managed fields that differ (every field when there is no hook yet)."""
    before, after = hook_view(existing) or {}, hook_view(desired) or {}
    return sorted(key for key in MANAGED_FIELDS if before.get(key) != after.get(key))


class HookManager:
    """Puts (or deletes) one launch hook on many Auto Scaling groups, through ``gateway`` (a :class:`LifecycleGateway`)."""

    def __init__(self, gateway, check_mode=False):
        self.gateway = gateway
        self.check_mode = check_mode

    def apply(self, group, hook_name, desired, state="present"):
        """One group's (a DescribeAutoScalingGroups record) result: name, status (created/updated/unchanged/deleted/absent/failed), changes, before, after."""
        group_name = group["AutoScalingGroupName"]
        result = {"name": group_name, "hook_name": hook_name, "status": None, "changes": [], "error": None}
        try:
            current = self.gateway.hook(group_name, hook_name)
            result["before"] = hook_view(current)
            if state == "absent":
                result["after"] = None
                if current is None:
                    result["status"] = "absent"
                    return result
                result["status"], result["changes"] = "deleted", ["LifecycleHook"]
                if not self.check_mode:
                    self.gateway.delete_hook(group_name, hook_name)
                return result
            result["after"] = hook_view(desired)
            changes = hook_changes(current, desired)
            if not changes:
                result["status"] = "unchanged"
                return result
            result["status"], result["changes"] = ("created" if current is None else "updated"), changes
            if current is not None and current.get("LifecycleTransition") not in (None, LAUNCHING):
                raise LifecycleError(f"hook {hook_name!r} on {group_name} is a {current['LifecycleTransition']} hook: "
                                     "choose another hook_name (a hook's transition is not changed in place)")
            # PutLifecycleHook cannot clear a field (botocore refuses empty strings), so a target, role or
            # metadata that must go means delete + put; deleting abandons held launches, so only when none wait.
            clear = [key for key in ("NotificationTargetARN", "RoleARN", "NotificationMetadata")
                     if key in (hook_view(current) or {}) and key not in desired]
            if clear:
                waiting = sorted(i["InstanceId"] for i in group.get("Instances", [])
                                 if i.get("LifecycleState") == PENDING_WAIT)
                if waiting:
                    raise LifecycleError(
                        f"{group_name}: removing {', '.join(clear)} needs the hook deleted and put again, which "
                        f"would abandon {len(waiting)} instance(s) in Pending:Wait ({', '.join(waiting)}): "
                        "run again once they are completed")
            if not self.check_mode:
                if clear:
                    self.gateway.delete_hook(group_name, hook_name)
                self.gateway.put_hook(desired)
        except LifecycleError as exc:
            result.update(status="failed", error=str(exc))
        except AWS_ERRORS as exc:  # confined to this group
            result.update(status="failed", error=f"{group_name}: {describe_error(exc)}")
        return result


def hook_diff(groups):
    before = {g["name"]: g.get("before") for g in groups if g["status"] not in ("failed",)}
    after = {g["name"]: g.get("after") for g in groups if g["status"] not in ("failed",)}
    return {"before": before, "after": after}


# --------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------


def normalise_actions(instances, asg_name=None, hook_name=None, result=None, action="complete"):
    """Per-instance requests from the module's ``instances`` (dicts or ids) and its defaults."""
    requests, seen = [], set()
    for item in instances or []:
        entry = {"instance_id": item} if isinstance(item, str) else dict(item)
        instance_id = entry.get("instance_id")
        if not instance_id or not str(instance_id).startswith("i-"):
            raise LifecycleError(f"instances: {item!r} has no instance_id such as i-0123456789abcdef0")
        request = {
            "instance_id": instance_id,
            "asg_name": entry.get("asg_name") or asg_name,
            "hook_name": entry.get("hook_name") or hook_name,
            "token": entry.get("token") or None,
            "result": entry.get("result") or result,
        }
        if action == "complete" and request["result"] not in RESULTS:
            raise LifecycleError(f"instances: {instance_id} needs a result of CONTINUE or ABANDON "
                                 f"(per instance or as the module's result), not {request['result']!r}")
        key = (instance_id, request["hook_name"])
        if key in seen:
            raise LifecycleError(f"instances: {instance_id} is listed twice")
        seen.add(key)
        requests.append(request)
    if not requests:
        raise LifecycleError("instances is empty: name at least one instance")
    return requests


class ActionRunner:
    """Completes or heartbeats lifecycle actions for many instances, ``max_concurrency`` calls at a time, through
    ``gateway`` (a :class:`LifecycleGateway`)."""

    def __init__(self, gateway, max_concurrency=10, check_mode=False):
        self.gateway = gateway
        self.max_concurrency = max_concurrency
        self.check_mode = check_mode

    def plan(self, requests):
        """Fill in groups and hooks from Auto Scaling; instances not in Pending:Wait are settled without a call."""
        states = self.gateway.instance_states([r["instance_id"] for r in requests])
        hooks_of = {}
        planned, settled = [], []
        for request in requests:
            record = states.get(request["instance_id"])
            state = record["LifecycleState"] if record else None
            request = dict(request, lifecycle_state_before=state)
            if record and not request["asg_name"]:
                request["asg_name"] = record["AutoScalingGroupName"]
            if state != PENDING_WAIT:
                # Completed already (InService, or terminated after ABANDON), or not held at all.
                settled.append(dict(request, status=NOT_PENDING if state else ALREADY_COMPLETED, error=None))
                continue
            if request["hook_name"]:
                planned.append(request)
                continue
            group = request["asg_name"]
            if group not in hooks_of:
                hooks_of[group] = self.gateway.launch_hook_names(group)
            if not hooks_of[group]:
                settled.append(dict(request, status=FAILED,
                                    error=f"{request['instance_id']}: group {group} has no launch lifecycle hook"))
            for hook in hooks_of[group]:
                planned.append(dict(request, hook_name=hook))
        return planned, settled

    def _call(self, action, request):
        complete = action == "complete"
        if self.check_mode:
            return dict(request, status=WOULD_COMPLETE if complete else WOULD_HEARTBEAT, error=None)
        action_of = {"instance_id": request["instance_id"], "token": request["token"]}
        try:
            if complete:
                active = self.gateway.complete(request["asg_name"], request["hook_name"], request["result"], **action_of)
            else:
                active = self.gateway.heartbeat(request["asg_name"], request["hook_name"], **action_of)
        except AWS_ERRORS as exc:
            return dict(request, status=FAILED, error=f"{request['instance_id']}: {describe_error(exc)}")
        if not active:  # "No active Lifecycle Action found": completed already (or timed out)
            return dict(request, status=ALREADY_COMPLETED, error=None)
        return dict(request, status=COMPLETED if complete else HEARTBEAT, error=None)

    def run(self, action, requests):
        planned, settled = self.plan(requests)
        if planned:
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(planned))) as pool:
                done = self.tell_token_mismatches(list(pool.map(lambda r: self._call(action, r), planned)))
        else:
            done = []
        return sorted(settled + done, key=lambda r: (r["instance_id"], r["hook_name"] or ""))

    def tell_token_mismatches(self, results):
        """A token AWS does not know ("No active Lifecycle Action found with token") while the instance still
        waits in Pending:Wait is not a completed action: the token is not that of the open action (a stale or
        foreign notification). The state is read again to tell the two apart; nothing was completed."""
        suspects = [r for r in results if r["status"] == ALREADY_COMPLETED and r.get("token")]
        if not suspects:
            return results
        states = self.gateway.instance_states([r["instance_id"] for r in suspects])
        suspect_ids = {id(r) for r in suspects}
        out = []
        for result in results:
            record = states.get(result["instance_id"]) if id(result) in suspect_ids else None
            if record and record["LifecycleState"] == PENDING_WAIT:
                result = dict(result, status=TOKEN_MISMATCH, error=(
                    f"{result['instance_id']}: the token {result['token']} does not match the lifecycle action the "
                    f"instance waits on in Pending:Wait (hook {result['hook_name']} of {result['asg_name']}); "
                    "nothing was completed, the action stays open"))
            out.append(result)
        return out

    def heartbeat_until_done(self, requests, interval, lifetime, sleep=time.sleep, clock=time.monotonic, stop=None):
        """Heartbeat every ``interval`` s until no action is left open, ``lifetime`` s passed or ``stop()``.

        An action leaves the loop when it is completed (AWS answers "No active
        Lifecycle Action found") or fails; the last result per instance is returned.
        ``stop`` (checked at least once a second between heartbeats) ends the loop
        at once: the caller completed the action, or the process that started the
        loop is gone.
        """
        deadline = clock() + lifetime
        latest = {}
        active = list(requests)
        beats = 0
        while active:
            results = self.run("heartbeat", active)
            beats += 1
            for result in results:
                latest[(result["instance_id"], result["hook_name"])] = dict(result, heartbeats=beats)
            still = {(r["instance_id"], r["hook_name"]) for r in results if r["status"] == HEARTBEAT}
            active = [dict(r, hook_name=r["hook_name"]) for r in results
                      if (r["instance_id"], r["hook_name"]) in still]
            if not active or clock() + interval > deadline:
                break
            if stop is None:
                sleep(interval)
                continue
            wake = clock() + interval
            while not stop() and clock() < wake:
                sleep(min(1.0, max(0.0, wake - clock())))
            if stop():
                break
        return sorted(latest.values(), key=lambda r: (r["instance_id"], r["hook_name"] or ""))


def public_result(result):
    """One instance's entry for the module's return value."""
    keys = ("instance_id", "asg_name", "hook_name", "result", "status", "error", "lifecycle_state_before",
            "heartbeats")
    out = {key: result.get(key) for key in keys if key in result}
    out["token_used"] = bool(result.get("token"))
    return out

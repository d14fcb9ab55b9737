# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The Auto Scaling side of the lifecycle hooks and actions: every call ``lifecycle.py`` makes.

:class:`LifecycleGateway` reads, puts and deletes lifecycle hooks, reads the group's launch hook names
and the instances' lifecycle states (DescribeAutoScalingInstances, paged with ``aws_calls.items`` and
batched with ``aws_calls.chunks``), and completes or heartbeats lifecycle actions. The one error it maps
is ``ValidationError: No active Lifecycle Action found`` (the action was completed already or timed out):
:meth:`LifecycleGateway.complete` and :meth:`LifecycleGateway.heartbeat` answer False for it. Every
other error is botocore's, raised as is. It decides nothing: ``HookManager`` and ``ActionRunner``
(``lifecycle.py``) do.

The client is a boto3 client, usually amazon.aws's retrying wrapper: every call passes ``aws_retry=True``
unless the gateway is given other ``call_kwargs`` (``{}`` for a plain client, as the inventory's).
"""

from __future__ import annotations

try:
    import botocore.exceptions

    CLIENT_ERROR = botocore.exceptions.ClientError
except ImportError:  # AnsibleAWSModule reports the missing SDK; the inventory plugin fails on its own import
    CLIENT_ERROR = ()

from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import chunks
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_code
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_message
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import items

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
NO_ACTIVE_ACTION = "No active Lifecycle Action found"
INSTANCE_BATCH = 50  # DescribeAutoScalingInstances: at most 50 instance ids per call


def is_no_active_action(exc):
    """AWS's answer for an action that was completed already or timed out: final, never retried."""
    return error_code(exc) == "ValidationError" and NO_ACTIVE_ACTION in error_message(exc)


class LifecycleGateway:
    """The lifecycle code's Auto Scaling calls (see the file's docstring)."""

    def __init__(self, autoscaling, call_kwargs=None):
        self.autoscaling = autoscaling
        self.call_kwargs = {"aws_retry": True} if call_kwargs is None else dict(call_kwargs)

    # --- hooks ---------------------------------------------------------------------------

    def hook(self, group_name, hook_name):
        """The group's hook named ``hook_name`` as DescribeLifecycleHooks returns it, or None."""
        hooks = self.autoscaling.describe_lifecycle_hooks(
            **self.call_kwargs, AutoScalingGroupName=group_name, LifecycleHookNames=[hook_name])["LifecycleHooks"]
        return hooks[0] if hooks else None

    def put_hook(self, hook):
        """PutLifecycleHook with ``hook``'s fields (a DescribeLifecycleHooks record's request keys)."""
        self.autoscaling.put_lifecycle_hook(**self.call_kwargs, **hook)

    def delete_hook(self, group_name, hook_name):
        self.autoscaling.delete_lifecycle_hook(**self.call_kwargs, AutoScalingGroupName=group_name,
                                               LifecycleHookName=hook_name)

    def launch_hook_names(self, group_name):
        """Sorted names of the group's launch (``EC2_INSTANCE_LAUNCHING``) hooks: those a Pending:Wait instance of
        the group can be held by. DescribeLifecycleHooks is not paginated."""
        answer = self.autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=group_name, **self.call_kwargs)
        return sorted(h["LifecycleHookName"] for h in answer.get("LifecycleHooks") or ()
                      if h.get("LifecycleTransition") == LAUNCHING)

    # --- instances and actions -----------------------------------------------------------

    def instance_states(self, instance_ids):
        """{instance id: DescribeAutoScalingInstances record} for the instances Auto Scaling still knows."""
        found = {}
        for batch in chunks(sorted(set(instance_ids)), INSTANCE_BATCH):
            records = items(self.autoscaling.describe_auto_scaling_instances,
                            {"InstanceIds": batch, "MaxRecords": INSTANCE_BATCH}, "AutoScalingInstances", **self.call_kwargs)
            for record in records:
                found[record["InstanceId"]] = record
        return found

    def complete(self, group_name, hook_name, result, instance_id=None, token=None):
        """CompleteLifecycleAction of the action named by ``token`` (else by ``instance_id``); False when AWS has
        no active action (completed already or timed out)."""
        return self._action(self.autoscaling.complete_lifecycle_action, group_name, hook_name, instance_id, token,
                            LifecycleActionResult=result)

    def heartbeat(self, group_name, hook_name, instance_id=None, token=None):
        """RecordLifecycleActionHeartbeat, as :meth:`complete`; False when AWS has no active action."""
        return self._action(self.autoscaling.record_lifecycle_action_heartbeat, group_name, hook_name, instance_id,
                            token)

    def _action(self, method, group_name, hook_name, instance_id, token, **extra):
        params = {"AutoScalingGroupName": group_name, "LifecycleHookName": hook_name}
        if token:
            params["LifecycleActionToken"] = token
        else:
            params["InstanceId"] = instance_id
        try:
            method(**self.call_kwargs, **extra, **params)
        except CLIENT_ERROR as exc:
            if is_no_active_action(exc):
                return False
            raise
        return True

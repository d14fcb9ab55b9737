#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: asg_lifecycle_hook
version_added: 0.1.0
short_description: Put a launch lifecycle hook on every selected Auto Scaling group
description:
  - For every Auto Scaling group named in O(names) or matching O(tag_filters), makes sure a launch lifecycle hook
    (C(autoscaling:EC2_INSTANCE_LAUNCHING)) named O(hook_name) exists with the given heartbeat timeout, default
    result and notification settings, so that new instances wait in C(Pending:Wait) until they are configured
    (see the C(fleetkeeper.aws.provision) playbook and C(fleetkeeper.aws.asg_lifecycle_action)).
  - Every managed field is compared, including a notification target, role or metadata that is no longer wanted;
    a hook is put only when something differs. Each group is handled on its own; a failure in one group is
    reported in RV(groups) and does not stop the others.
  - Why not C(community.aws.autoscaling_lifecycle_hook)? It handles one group per task (selecting groups by tag
    needs an extra info task and a loop, one module run per group), has no diff, and compares only the fields
    given in the task, so removing a notification target or metadata is never noticed. This module selects
    groups the way C(fleetkeeper.aws.asg_instance_profile) does (names and/or tags, one task) and returns a
    per-group diff.
  - Adding a hook does not affect instances already running; only instances launched afterwards are held.
  - Auto Scaling cannot clear a hook's notification target, role or metadata in place, so removing one deletes
    the hook and puts it again; that is refused (for that group) while instances wait in C(Pending:Wait), since
    deleting the hook would abandon them.
author:
  - fleetkeeper maintainers (@fleetkeeper)
options:
  hook_name:
    description: Name of the lifecycle hook on each group.
    type: str
    default: fleetkeeper-provision
  state:
    description: V(present) puts the hook; V(absent) deletes it (AWS then abandons the launches it holds).
    type: str
    choices: [present, absent]
    default: present
  heartbeat_timeout:
    description:
      - Seconds an instance waits in C(Pending:Wait) without a heartbeat before O(default_result) applies
        (30 to 7200). A heartbeat restarts the timer; the total wait is capped at min(48 hours, 100 times this).
    type: int
    default: 3600
  default_result:
    description:
      - What happens when the timeout passes. V(ABANDON) terminates the instance (the group replaces it), so an
        unconfigured instance never takes traffic; V(CONTINUE) puts it in service anyway.
    type: str
    choices: [ABANDON, CONTINUE]
    default: ABANDON
  notification_target_arn:
    description:
      - ARN of an SQS standard queue or SNS topic that receives the hook's notifications (for the Event-Driven
        Ansible source). FIFO queues are refused, as Auto Scaling refuses them.
      - Leave unset for EventBridge, which receives lifecycle events without a target.
    type: str
  role_arn:
    description: ARN of the IAM role Auto Scaling assumes to publish to O(notification_target_arn) (required with it).
    type: str
  notification_metadata:
    description: Text added to every notification as C(NotificationMetadata) (at most 1023 characters).
    type: str
extends_documentation_fragment:
  - fleetkeeper.aws.asg_selection
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
attributes:
  check_mode:
    support: full
    description: Reports which groups would get, change or lose the hook, without putting it.
  diff_mode:
    support: full
    description: Per group, the hook's managed fields before and after.
  idempotent:
    support: full
    description: A second run with the same arguments changes nothing.
notes:
  - Retries throttling, server errors and C(ResourceContention) with jittered backoff.
"""

EXAMPLES = r"""
- name: Hold every new instance of the web and bastion groups until it is configured
  fleetkeeper.aws.asg_lifecycle_hook:
    names: [web, bastion]
    heartbeat_timeout: 900

- name: The same on every group of the fleet, notifying an SQS queue for Event-Driven Ansible
  fleetkeeper.aws.asg_lifecycle_hook:
    tag_filters:
      fleetkeeper:fleet: "*"
    notification_target_arn: arn:aws:sqs:eu-west-1:123456789012:fleetkeeper-lifecycle
    role_arn: arn:aws:iam::123456789012:role/fleetkeeper-lifecycle-notify
    notification_metadata: '{"playbook": "fleetkeeper.aws.provision"}'

- name: Remove the hook
  fleetkeeper.aws.asg_lifecycle_hook:
    names: [web]
    state: absent
"""

RETURN = r"""
groups:
  description: One entry per selected group.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The group.
      type: str
      returned: always
    hook_name:
      description: The hook.
      type: str
      returned: always
    status:
      description: V(created), V(updated), V(unchanged), V(deleted), V(absent) or V(failed).
      type: str
      returned: always
    changes:
      description: Names of the hook fields that change (C(LifecycleHook) for a deletion).
      type: list
      elements: str
      returned: always
    before:
      description: The hook's managed fields before (null when there was none).
      type: dict
      returned: when the group could be read
    after:
      description: The hook's managed fields after (null after a deletion).
      type: dict
      returned: when the group could be read
    error:
      description: Why the group failed.
      type: str
      returned: always
failed_groups:
  description: Names of the groups that failed.
  returned: always
  type: list
  elements: str
"""

try:
    import botocore.exceptions
except ImportError:
    pass  # Handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_groups import GroupSelectionError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_groups import find_groups
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import RETRY_CODES
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import HookManager
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import LifecycleError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import desired_hook
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import hook_diff
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import validate_hook_options
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle_gateway import LifecycleGateway


def main():
    argument_spec = dict(
        names=dict(type="list", elements="str", aliases=["asg_names"]),
        tag_filters=dict(type="dict"),
        hook_name=dict(type="str", default="fleetkeeper-provision"),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        heartbeat_timeout=dict(type="int", default=3600),
        default_result=dict(type="str", choices=["ABANDON", "CONTINUE"], default="ABANDON"),
        notification_target_arn=dict(type="str"),
        role_arn=dict(type="str"),
        notification_metadata=dict(type="str"),
    )
    module = AnsibleAWSModule(argument_spec=argument_spec, required_one_of=[["names", "tag_filters"]],
                              supports_check_mode=True)
    params = module.params
    try:
        if params["state"] == "present":
            validate_hook_options(params["heartbeat_timeout"], params["default_result"],
                                  params["notification_target_arn"], params["role_arn"])
            if params["notification_metadata"] and len(params["notification_metadata"]) > 1023:
                raise LifecycleError("notification_metadata is longer than 1023 characters")
    except LifecycleError as exc:
        module.fail_json(msg=str(exc))

    retry = AWSRetry.jittered_backoff(retries=8, delay=1, max_delay=20, catch_extra_error_codes=RETRY_CODES)
    autoscaling = module.client("autoscaling", retry_decorator=retry)
    try:
        groups = find_groups(autoscaling, params["names"], params["tag_filters"])
    except GroupSelectionError as exc:
        module.fail_json(msg=str(exc), groups=[], failed_groups=[])
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        module.fail_json_aws(exc, msg="Could not read the Auto Scaling groups")

    manager = HookManager(LifecycleGateway(autoscaling), check_mode=module.check_mode)
    results = []
    for group in groups:
        name = group["AutoScalingGroupName"]
        desired = desired_hook(name, params["hook_name"], params["heartbeat_timeout"], params["default_result"],
                               params["notification_target_arn"], params["role_arn"], params["notification_metadata"])
        results.append(manager.apply(group, params["hook_name"], desired, params["state"]))
    changed = any(r["status"] in ("created", "updated", "deleted") for r in results)
    failed = [r for r in results if r["status"] == "failed"]
    output = {"changed": changed, "groups": results, "failed_groups": [r["name"] for r in failed]}
    if module._diff:
        output["diff"] = hook_diff(results)
    if failed:
        module.fail_json(msg=f"{len(failed)} of {len(results)} group(s) failed: " + "; ".join(r["error"] for r in failed),
                         **output)
    module.exit_json(**output)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: asg_lifecycle_action
version_added: 0.1.0
short_description: Complete, or send heartbeats for, Auto Scaling launch lifecycle actions of many instances
description:
  - Completes the lifecycle actions of instances waiting in C(Pending:Wait) with V(CONTINUE) (put in service) or
    V(ABANDON) (terminate; the group launches a replacement), or records heartbeats that restart their timers, for
    many instances at once, O(max_concurrency) calls at a time, with one result per instance.
  - The instances' states are read first (C(DescribeAutoScalingInstances)). An instance that is no longer in
    C(Pending:Wait) is not touched again and reported as V(not_pending) (or V(already_completed) when Auto Scaling
    no longer knows it). AWS's C(ValidationError) "No active Lifecycle Action found" (completed meanwhile, or timed
    out) is final; it is reported as V(already_completed) and never retried. C(ResourceContention), throttling and server
    errors are retried with jittered backoff. A failure for one instance does not stop the others.
  - Without a hook name, every launch hook of the instance's group is completed.
  - With O(action=heartbeat) and O(heartbeat_lifetime), the module keeps sending heartbeats every
    O(heartbeat_interval) seconds until every action is completed (by another task), the lifetime is over,
    O(stop_file) appears or the process O(watch_pid) ends; run it with C(async) beside a long configuration run.
  - A completion by token that AWS does not know while the instance still waits in C(Pending:Wait) is reported as
    V(token_mismatch) (the token is not that of the open action, a stale or foreign notification) and fails the
    task; nothing is completed.
  - Why not C(community.aws.autoscaling_complete_lifecycle_action)? It takes one instance id per task and no
    token, fails on every error including "No active Lifecycle Action found" (so a re-run or a redelivered event
    fails instead of being recognised as done) and does not retry contention. No Ansible module records
    heartbeats.
author:
  - fleetkeeper maintainers (@fleetkeeper)
options:
  instances:
    description:
      - The instances, as instance ids or as dictionaries with C(instance_id) and optionally C(asg_name),
        C(hook_name), C(token) (the C(LifecycleActionToken) from a notification) and C(result), each of which
        overrides the module's option of the same name for that instance.
    type: list
    elements: raw
    required: true
  action:
    description: V(complete) completes the actions; V(heartbeat) records heartbeats.
    type: str
    choices: [complete, heartbeat]
    default: complete
  result:
    description: The result for every instance that does not name its own (required to complete).
    type: str
    choices: [CONTINUE, ABANDON]
  asg_name:
    description: The instances' Auto Scaling group; read from Auto Scaling when not given.
    type: str
  hook_name:
    description: The lifecycle hook; every launch hook of the group when not given.
    type: str
  max_concurrency:
    description: Most calls in flight at once (1 to 50).
    type: int
    default: 10
  heartbeat_interval:
    description: Seconds between heartbeats with O(heartbeat_lifetime).
    type: int
    default: 60
  heartbeat_lifetime:
    description:
      - With O(action=heartbeat), keep sending heartbeats for up to this many seconds, stopping as soon as no
        action is left open. V(0) sends one heartbeat.
    type: int
    default: 0
  stop_file:
    description:
      - With O(heartbeat_lifetime), stop sending heartbeats within a second of this file appearing (on the host
        that runs the module, the controller when delegated to C(localhost)), and remove it. The task that
        completes the action creates it, so the heartbeat job ends with the host's completion instead of at its
        next heartbeat.
    type: path
  watch_pid:
    description:
      - With O(heartbeat_lifetime), stop sending heartbeats within a second of this process ending.
      - When the module runs on the controller (a task delegated to C(localhost), or a local connection) and this is not
        set, the collection's action plugin sets it to the C(ansible-playbook) process, so a heartbeat job started
        with C(async) never outlives the run that started it, even one that was killed.
    type: int
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
attributes:
  check_mode:
    support: full
    description: Reads the instances' states and reports what would be completed, without completing.
  diff_mode:
    support: full
    description: Per instance, the lifecycle state before and the one expected after.
  idempotent:
    support: full
    description: An instance already completed is not touched again (RV(instances[].status) V(not_pending) or
      V(already_completed)).
"""

EXAMPLES = r"""
- name: Put a configured instance in service
  fleetkeeper.aws.asg_lifecycle_action:
    instances: [i-0123456789abcdef0]
    result: CONTINUE

- name: Complete many at once, each with its own result and token
  fleetkeeper.aws.asg_lifecycle_action:
    asg_name: web
    hook_name: fleetkeeper-provision
    instances:
      - {instance_id: i-0123456789abcdef0, result: CONTINUE, token: 7d0e5bb2-0b1c-4c3e-9a43-2f8f4f6c1b1e}
      - {instance_id: i-0fedcba9876543210, result: ABANDON}

- name: Keep the action alive while a long configuration runs (stops once the action is completed)
  fleetkeeper.aws.asg_lifecycle_action:
    instances: [i-0123456789abcdef0]
    action: heartbeat
    heartbeat_interval: 300
    heartbeat_lifetime: 3600
    stop_file: /tmp/heartbeat-i-0123456789abcdef0.stop   # touched by the task that completes the action
  delegate_to: localhost
  async: 3700
  poll: 0
"""

RETURN = r"""
instances:
  description: One entry per instance and hook.
  returned: always
  type: list
  elements: dict
  contains:
    instance_id:
      description: The instance.
      type: str
      returned: always
    asg_name:
      description: Its Auto Scaling group.
      type: str
      returned: always
    hook_name:
      description: The hook whose action was completed or kept alive.
      type: str
      returned: always
    result:
      description: V(CONTINUE) or V(ABANDON) (null for heartbeats).
      type: str
      returned: always
    status:
      description:
        - V(completed), V(heartbeat), V(would_complete) / V(would_heartbeat) (check mode), V(already_completed)
          (no open action; done before, timed out, or terminated), V(not_pending) (the instance is not in
          C(Pending:Wait)), V(token_mismatch) (the token is not that of the action the instance waits on; nothing
          was done), or V(failed).
      type: str
      returned: always
    lifecycle_state_before:
      description: The instance's lifecycle state when the task started (null when Auto Scaling does not know it).
      type: str
      returned: always
    heartbeats:
      description: How many heartbeat rounds ran (with O(heartbeat_lifetime)).
      type: int
      returned: with O(action=heartbeat)
    token_used:
      description: Whether the action was addressed by its token rather than by instance id.
      type: bool
      returned: always
    error:
      description: Why it failed, naming the instance.
      type: str
      returned: always
summary:
  description: How many instances ended in each status.
  returned: always
  type: dict
  sample: {completed: 3, already_completed: 1}
"""

import collections
import os

try:
    import botocore.exceptions
except ImportError:
    pass  # Handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import CHANGING
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import FAILING
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import RETRY_CODES
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import ActionRunner
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import LifecycleError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import normalise_actions
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import public_result
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle_gateway import LifecycleGateway


def expected_state(result):
    if result["status"] not in ("completed", "would_complete"):
        return result.get("lifecycle_state_before")
    return "InService" if result["result"] == "CONTINUE" else "Terminating"


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_condition(stop_file, watch_pid):
    """None (beat until done) or a callable that is true once the stop file exists or the watched process ended."""
    if not stop_file and not watch_pid:
        return None
    return lambda: bool(stop_file and os.path.exists(stop_file)) or bool(watch_pid and not process_alive(watch_pid))


def argument_spec():
    return dict(
        instances=dict(type="list", elements="raw", required=True),
        action=dict(type="str", choices=["complete", "heartbeat"], default="complete"),
        result=dict(type="str", choices=["CONTINUE", "ABANDON"]),
        asg_name=dict(type="str"),
        hook_name=dict(type="str"),
        max_concurrency=dict(type="int", default=10),
        heartbeat_interval=dict(type="int", default=60),
        heartbeat_lifetime=dict(type="int", default=0),
        stop_file=dict(type="path"),
        watch_pid=dict(type="int"),
    )


def main():
    module = AnsibleAWSModule(argument_spec=argument_spec(), supports_check_mode=True)
    params = module.params
    try:
        if not 1 <= params["max_concurrency"] <= 50:
            raise LifecycleError("max_concurrency must be between 1 and 50")
        if params["heartbeat_interval"] < 1 or params["heartbeat_lifetime"] < 0:
            raise LifecycleError("heartbeat_interval must be at least 1 and heartbeat_lifetime not negative")
        requests = normalise_actions(params["instances"], params["asg_name"], params["hook_name"],
                                     params["result"], params["action"])
    except LifecycleError as exc:
        module.fail_json(msg=str(exc), instances=[], summary={})

    retry = AWSRetry.jittered_backoff(retries=8, delay=1, max_delay=20, catch_extra_error_codes=RETRY_CODES)
    autoscaling = module.client("autoscaling", retry_decorator=retry,
                                config={"max_pool_connections": params["max_concurrency"] + 2})
    runner = ActionRunner(LifecycleGateway(autoscaling), params["max_concurrency"], module.check_mode)
    try:
        if params["action"] == "heartbeat" and params["heartbeat_lifetime"] and not module.check_mode:
            results = runner.heartbeat_until_done(requests, params["heartbeat_interval"], params["heartbeat_lifetime"],
                                                  stop=stop_condition(params["stop_file"], params["watch_pid"]))
        else:
            results = runner.run(params["action"], requests)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:  # reading states or hooks
        module.fail_json_aws(exc, msg="Could not read the instances' lifecycle states or hooks")
    exit_with(module, params, results)


def exit_with(module, params, results):
    """Exit with the runs' results (and remove the stop file): failed when an action failed."""
    output = {
        "changed": any(r["status"] in CHANGING for r in results),
        "instances": [public_result(r) for r in results],
        "summary": dict(collections.Counter(r["status"] for r in results)),
    }
    if module._diff and params["action"] == "complete":
        output["diff"] = {
            "before": {r["instance_id"]: r.get("lifecycle_state_before") for r in results},
            "after": {r["instance_id"]: expected_state(r) for r in results},
        }
    if params["stop_file"]:
        try:
            os.unlink(params["stop_file"])
        except FileNotFoundError:
            pass
    failed = [r for r in results if r["status"] in FAILING]
    if failed:
        module.fail_json(msg=f"{len(failed)} of {len(results)} lifecycle action(s) failed: "
                         + "; ".join(r["error"] for r in failed), **output)
    module.exit_json(**output)


if __name__ == "__main__":
    main()

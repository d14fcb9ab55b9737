#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: asg_instance_profile
version_added: 0.1.0
short_description: Roll an IAM instance profile onto Auto Scaling groups and their running instances
description:
  - For every Auto Scaling group named in O(names) or matching O(tag_filters), makes sure the launch template
    version the group uses carries the instance profile O(instance_profile), and that every C(InService) instance
    is associated with it.
  - A new launch template version is created only when the version the group follows does not carry the profile
    already. Profiles are compared by ARN (a template that names the profile by name counts as the same profile).
    The new version is made from the followed version with C(SourceVersion) and only C(IamInstanceProfile)
    changed, so nothing else in the template moves.
  - The group is then pointed at the new version as O(launch_template_version) says, and RV(groups[].launch_templates)
    reports whether it follows C($Latest), C($Default) or a pinned version. Mixed instances policies (including
    per-override launch templates) are handled the same way. Groups on a launch configuration are refused with
    a message saying so.
  - Instances are read with batched C(DescribeIamInstanceProfileAssociations) calls and changed concurrently, at
    most O(max_concurrency) calls at a time. An instance without a profile is associated. An instance carrying
    another profile is replaced only with O(replace=true), otherwise it is reported in RV(mismatched) and left
    alone. Associations that are still C(associating) or C(disassociating) are waited for; a replace that EC2
    refuses (C(IncorrectState)) falls back to disassociate then associate.
  - IAM is eventually consistent. A profile created moments ago is waited for with the C(instance_profile_exists)
    waiter, and EC2's C(Invalid IAM Instance Profile) answer is retried with backoff for up to O(wait_timeout)
    seconds. Throttling and server errors are retried with jittered backoff.
  - Input is checked before any change. An unknown group, a group on a launch configuration, a missing launch
    template or version, or a missing profile fails the task with nothing changed. A failure while applying
    (an API error after retries) affects only its own group; the others are finished, and the failure result
    lists every group with its status.
  - O(state=absent) detaches O(instance_profile) from the instances and creates launch template versions without
    it. Associations with another profile are left alone.
author:
  - fleetkeeper maintainers (@fleetkeeper)
options:
  instance_profile:
    description:
      - Name or ARN of the IAM instance profile.
      - With O(state=absent) the profile must still exist, so that its ARN can be recognised.
    type: str
    required: true
  state:
    description:
      - V(present) attaches the profile; V(absent) detaches it.
    type: str
    choices: [present, absent]
    default: present
  replace:
    description:
      - Replace an association with another instance profile. When V(false) such instances are reported in
        RV(mismatched), with a warning, and not changed.
    type: bool
    default: false
  launch_template_version:
    description:
      - Which launch template version the group uses afterwards.
      - V(keep) keeps what the group follows. A group on C($Latest) follows the new version as it is; a group on
        C($Default) gets the template's default version moved to the new version (which other users of the
        template follow too); a group pinned to a number is pinned to the new version.
      - V(latest) points the group at C($Latest); V(default) points it at C($Default) and moves the default
        version; V(pinned) pins the group to the version number.
    type: str
    choices: [keep, latest, default, pinned]
    default: keep
  manage_launch_template:
    description:
      - Whether to create launch template versions and update the groups. V(false) only changes instances.
    type: bool
    default: true
  manage_instances:
    description:
      - Whether to associate (or replace, or detach) the profile on the C(InService) instances. V(false) only
        changes the launch templates; instances then get the profile when they are replaced.
    type: bool
    default: true
  instance_refresh:
    description:
      - Start an instance refresh on every group whose launch template got a new version.
      - An instance refresh already in progress is reported with a warning, not as a failure.
    type: bool
    default: false
  instance_refresh_preferences:
    description:
      - 'C(Preferences) passed to C(StartInstanceRefresh), for example C({MinHealthyPercentage: 90}).'
    type: dict
  max_concurrency:
    description:
      - Most API calls in flight at once when reading templates and changing instances.
    type: int
    default: 10
  wait_timeout:
    description:
      - Seconds to wait for a just-created instance profile to become usable, and for associations that are
        changing state to settle.
    type: int
    default: 120
notes:
  - Runs on the controller (or wherever the AWS API is reachable); it does not connect to the instances.
  - Moving C($Default) affects every user of the launch template, not only the groups selected here.
  - Instances that are not C(InService) (Pending, Standby, Terminating...) are listed in
    RV(groups[].skipped_instances) and not changed; they get the profile from the launch template when they launch.
extends_documentation_fragment:
  - fleetkeeper.aws.asg_selection
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
attributes:
  check_mode:
    support: full
    description: Reports every launch template version, group update and instance association it would make.
  diff_mode:
    support: full
    description: Per group, the launch template version and instance profile before and after, and every
      instance whose association changes.
  idempotent:
    support: full
    description: A second run with the same arguments changes nothing.
"""

EXAMPLES = r"""
- name: Roll the web profile onto two groups, replacing other profiles
  fleetkeeper.aws.asg_instance_profile:
    instance_profile: web
    names: [web-blue, web-green]
    replace: true
  register: rollout

- name: Every group tagged team=payments, pinned to the new version, with an instance refresh
  fleetkeeper.aws.asg_instance_profile:
    instance_profile: arn:aws:iam::123456789012:instance-profile/apps/payments
    tag_filters:
      team: payments
    launch_template_version: pinned
    instance_refresh: true
    instance_refresh_preferences:
      MinHealthyPercentage: 90
    region: eu-west-1

- name: Detach the profile again
  fleetkeeper.aws.asg_instance_profile:
    instance_profile: web
    names: [web-blue]
    state: absent

- name: What would change (no API writes)
  fleetkeeper.aws.asg_instance_profile:
    instance_profile: web
    tag_filters:
      fleetkeeper:fleet: "*"
  check_mode: true
  diff: true
"""

RETURN = r"""
instance_profile:
  description: The instance profile rolled out.
  returned: success
  type: dict
  contains:
    name:
      description: Its name.
      type: str
      returned: success
      sample: web
    arn:
      description: Its ARN (null only in check mode when the profile does not exist yet).
      type: str
      returned: success
      sample: arn:aws:iam::123456789012:instance-profile/web
groups:
  description: One entry per Auto Scaling group, in name order; also returned when the task fails.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The group's name.
      type: str
      returned: always
      sample: web-blue
    status:
      description: V(ok) (nothing to do), V(changed), or V(failed) (see RV(groups[].error)).
      type: str
      returned: always
      sample: changed
    changed:
      description: Whether anything of this group changed (or would, in check mode).
      type: bool
      returned: always
    error:
      description: Why the group failed, naming the group and what to fix.
      type: str
      returned: always
      sample: null
    launch_templates:
      description:
        - One entry per launch template reference of the group (C(LaunchTemplate), C(MixedInstancesPolicy), and
          C(MixedInstancesPolicy.Overrides[N])).
        - Keys C(source), C(launch_template_id), C(launch_template_name), C(follows) (C($Latest), C($Default) or
          C(pinned)), C(spec_before)/C(spec_after) (the group's Version setting), C(version_before)/C(version_after)
          (the version number it resolves to), C(profile_before)/C(profile_after), C(created_version) (the new
          version number, predicted in check mode), C(set_default), C(update_group), C(changed).
      type: list
      elements: dict
      returned: always
    instance_refresh:
      description: C({id}) of the instance refresh started, or null.
      type: dict
      returned: always
    instances:
      description:
        - One entry per C(InService) instance with C(instance_id), C(action) (V(none), V(associate), V(replace),
          V(disassociate), V(mismatch)), C(profile_before), C(profile_after), C(association_id), and C(error) when it
          failed. C(fallback) says when a refused replace was done as disassociate + associate.
      type: list
      elements: dict
      returned: always
    skipped_instances:
      description: Instances not C(InService), with their C(lifecycle_state); they are not changed.
      type: list
      elements: dict
      returned: always
    mismatched:
      description: Instances of this group carrying another profile, left alone.
      type: list
      elements: str
      returned: always
mismatched:
  description: All instances carrying another profile and left alone (O(replace=false)).
  returned: success
  type: list
  elements: str
  sample: [i-0123456789abcdef0]
failed_groups:
  description: Names of the groups that failed.
  returned: always
  type: list
  elements: str
  sample: []
summary:
  description: Counts over all groups.
  returned: success
  type: dict
  sample:
    groups: 2
    groups_changed: 1
    groups_failed: 0
    instances: 5
    associated: 3
    replaced: 0
    disassociated: 0
    mismatched: 1
    unchanged: 1
    failed: 0
    skipped: 0
    launch_template_versions_created: 1
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_gateway import AutoScalingGateway
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import module_warn
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import AwsCallError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import InstanceProfileError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import PlanningError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_roll import Options
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_roll import Roller


def main():
    argument_spec = dict(
        instance_profile=dict(type="str", required=True),
        names=dict(type="list", elements="str", aliases=["asg_names"]),
        tag_filters=dict(type="dict"),
        **Options.argument_spec(),  # state, replace, wait_timeout and the roll-out settings, with their defaults
    )
    module = AnsibleAWSModule(
        argument_spec=argument_spec,
        required_one_of=[["names", "tag_filters"]],
        supports_check_mode=True,
    )
    params = module.params
    try:
        options = Options.from_params(params, check_mode=module.check_mode)
    except InstanceProfileError as exc:
        module.fail_json(msg=str(exc))

    # Throttling and 5xx: botocore's own retries first, then amazon.aws's jittered backoff.
    retry = AWSRetry.jittered_backoff(retries=8, delay=1, max_delay=20)
    pool = {"max_pool_connections": options.max_concurrency + 4}
    ec2 = module.client("ec2", retry_decorator=retry, config=pool)
    autoscaling = module.client("autoscaling", retry_decorator=retry, config=pool)
    iam = module.client("iam", retry_decorator=retry)

    roller = Roller(AutoScalingGateway(ec2, autoscaling, iam=iam), options, warn=module_warn(module))
    try:
        result = roller.run(params["instance_profile"], names=params["names"], tag_filters=params["tag_filters"])
    except PlanningError as exc:
        module.fail_json(msg=str(exc), changed=False, groups=exc.groups,
                         failed_groups=[g["name"] for g in exc.groups if g["status"] == "failed"])
    except AwsCallError as exc:  # the error code and request id go into the result
        module.fail_json_aws(exc.original, msg=f"{exc.action} failed", changed=False, groups=[], failed_groups=[])
    except InstanceProfileError as exc:
        module.fail_json(msg=str(exc), changed=False, groups=[], failed_groups=[])

    diff = result.pop("diff")
    if module._diff:
        result["diff"] = diff
    if result["failed_groups"]:
        failed = [g for g in result["groups"] if g["status"] == "failed"]
        done = [g["name"] for g in result["groups"] if g["status"] != "failed"]
        module.fail_json(
            msg=f"{len(failed)} of {len(result['groups'])} Auto Scaling group(s) failed: "
            + "; ".join(g["error"] for g in failed)
            + (f". Finished: {', '.join(done)}" if done else ""),
            **result,
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()

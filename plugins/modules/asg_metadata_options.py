#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: asg_metadata_options
version_added: 0.1.0
short_description: Roll instance metadata options (IMDSv2) onto Auto Scaling groups and their running instances
description:
  - For every Auto Scaling group named in O(names) or matching O(tag_filters), makes sure the launch template
    version the group uses carries O(metadata_options), and that every C(InService) instance has them.
  - Same roller as M(fleetkeeper.aws.asg_instance_profile) - group selection, launch template versions, the
    groups' version settings (O(launch_template_version)), mixed instances policies, instance refresh, check
    mode and diff all work the same way. A new launch template version is created only when the version the
    group follows does not carry the options already; it is made from that version with C(SourceVersion) and
    only C(MetadataOptions) sent (merged with what the template had), so nothing else in the template moves.
  - Running instances are read with batched C(DescribeInstances) calls and changed with
    C(ModifyInstanceMetadataOptions), at most O(max_concurrency) calls at a time, only where an option differs.
  - B(Know before you enforce.) Before requiring tokens (O(metadata_options.http_tokens=required)) on an instance
    that still accepts IMDSv1, the module reads CloudWatch's C(AWS/EC2) C(MetadataNoToken) metric of that instance
    over the last O(imdsv1_window_days) days (C(GetMetricData), 500 instances per call). A group with an instance
    that made IMDSv1 calls is B(refused) (nothing of it changes, its instances are listed in
    RV(imdsv1_instances)) unless O(force=true); the task then fails after finishing the other groups. In check mode
    the metric is read for every instance that still accepts IMDSv1, whatever O(metadata_options) asks, so a dry
    run lists the IMDSv1 users.
  - Input is checked before any change, as in M(fleetkeeper.aws.asg_instance_profile). A failure while applying
    affects only its own group; the others are finished, and the failure result lists every group with its status.
author:
  - fleetkeeper maintainers (@fleetkeeper)
options:
  metadata_options:
    description:
      - The instance metadata options to set. Options left out are not changed (on the instances) and are kept
        from the followed version (in the launch templates).
      - At least one is required.
    type: dict
    required: true
    suboptions:
      http_tokens:
        description:
          - V(required) turns IMDSv1 off (IMDSv2 session tokens only), as AWS recommends; V(optional) accepts both.
        type: str
        choices: [required, optional]
      http_put_response_hop_limit:
        description:
          - How many network hops the token's answer may take (1-64). V(1) keeps it on the instance itself.
          - Containers on the instance that reach the metadata service through a bridge network (Docker's default,
            ECS on EC2 in bridge mode, Kubernetes pods without host networking) are one hop further away and need
            V(2). Only set V(2) where such containers need instance credentials; otherwise keep V(1).
        type: int
      http_endpoint:
        description: V(disabled) turns the instance metadata service off altogether.
        type: str
        choices: [enabled, disabled]
      instance_metadata_tags:
        description: Whether the instance's tags are readable from the metadata service.
        type: str
        choices: [enabled, disabled]
  imdsv1_window_days:
    description:
      - Days of CloudWatch C(MetadataNoToken) data to read before requiring tokens (1-455).
    type: int
    default: 14
  force:
    description:
      - Require tokens even on groups whose instances made IMDSv1 calls in the window (they are still reported,
        with a warning). Those calls will fail afterwards.
    type: bool
    default: false
  launch_template_version:
    description:
      - Which launch template version the group uses afterwards, exactly as in
        M(fleetkeeper.aws.asg_instance_profile).
      - V(keep) keeps what the group follows (C($Latest) as it is, C($Default) moved to the new version, a pinned
        number re-pinned to the new version); V(latest), V(default), V(pinned) point the group there.
    type: str
    choices: [keep, latest, default, pinned]
    default: keep
  manage_launch_template:
    description: Whether to create launch template versions and update the groups.
    type: bool
    default: true
  manage_instances:
    description: Whether to change the C(InService) instances. V(false) only changes the launch templates.
    type: bool
    default: true
  instance_refresh:
    description: Start an instance refresh on every group whose launch template got a new version.
    type: bool
    default: false
  instance_refresh_preferences:
    description: 'C(Preferences) passed to C(StartInstanceRefresh), for example C({MinHealthyPercentage: 90}).'
    type: dict
  max_concurrency:
    description: Most API calls in flight at once when reading and changing (1-100).
    type: int
    default: 10
notes:
  - Runs on the controller; it does not connect to the instances.
  - Requiring tokens breaks software that calls the metadata service without one (old AWS SDKs and CLIs, C(curl)
    scripts, some agents). C(MetadataNoToken) counts successful IMDSv1 calls per instance; CloudWatch publishes
    it with basic monitoring at no extra cost. See the collection's docs/instance_profile.md for the migration path.
  - Instances that are not C(InService) are listed in RV(groups[].skipped_instances) and not changed.
extends_documentation_fragment:
  - fleetkeeper.aws.asg_selection
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
attributes:
  check_mode:
    support: full
    description: Reports every launch template version, group update and instance change it would make, and lists
      the instances that made IMDSv1 calls.
  diff_mode:
    support: full
    description: Per group, the launch template version and metadata options before and after, and every instance
      whose options change.
  idempotent:
    support: full
    description: A second run with the same arguments changes nothing.
"""

EXAMPLES = r"""
- name: Find the IMDSv1 users of every fleet (no change)
  fleetkeeper.aws.asg_metadata_options:
    tag_filters:
      fleetkeeper:fleet: "*"
    metadata_options:
      http_tokens: required
  check_mode: true
  register: imds_dry_run
  failed_when: false

- name: Require IMDSv2 on the web groups, hop limit 1
  fleetkeeper.aws.asg_metadata_options:
    names: [web-blue, web-green]
    metadata_options:
      http_tokens: required
      http_put_response_hop_limit: 1

- name: Container hosts (bridge networking) need one more hop
  fleetkeeper.aws.asg_metadata_options:
    tag_filters:
      role: ecs
    metadata_options:
      http_tokens: required
      http_put_response_hop_limit: 2
"""

RETURN = r"""
metadata_options:
  description: The options rolled out, by their API names.
  returned: success
  type: dict
  sample: {HttpTokens: required, HttpPutResponseHopLimit: 1}
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
    status:
      description: V(ok) (nothing to do), V(changed), V(refused) (IMDSv1 users, nothing changed) or V(failed).
      type: str
      returned: always
    changed:
      description: Whether anything of this group changed (or would, in check mode).
      type: bool
      returned: always
    error:
      description: Why the group failed or was refused.
      type: str
      returned: always
    launch_templates:
      description:
        - One entry per launch template reference, as in M(fleetkeeper.aws.asg_instance_profile), with
          C(metadata_options_before) and C(metadata_options_after) (the managed fields of the version used).
      type: list
      elements: dict
      returned: always
    instances:
      description:
        - One entry per C(InService) instance with C(instance_id), C(action) (V(none) or V(modify)),
          C(metadata_options_before), C(metadata_options_after), C(state), and C(error) when it failed.
      type: list
      elements: dict
      returned: always
    imdsv1_instances:
      description: Instances of this group that made IMDSv1 calls in the window, with C(calls).
      type: list
      elements: dict
      returned: always
    skipped_instances:
      description: Instances not C(InService), with their C(lifecycle_state); they are not changed.
      type: list
      elements: dict
      returned: always
    instance_refresh:
      description: C({id}) of the instance refresh started, or null.
      type: dict
      returned: always
imdsv1_instances:
  description: Every instance that made IMDSv1 calls in the window, with C(instance_id), C(group) and C(calls).
  returned: success
  type: list
  elements: dict
  sample: [{instance_id: i-0123456789abcdef0, group: web-blue, calls: 1440}]
imdsv1_window_days:
  description: The window the metric was read over.
  returned: success
  type: int
  sample: 14
refused_groups:
  description: Groups refused because of IMDSv1 users.
  returned: always
  type: list
  elements: str
failed_groups:
  description: Groups that failed.
  returned: always
  type: list
  elements: str
summary:
  description: Counts over all groups.
  returned: success
  type: dict
  sample:
    groups: 2
    groups_changed: 1
    groups_failed: 0
    groups_refused: 1
    instances: 5
    modified: 3
    unchanged: 0
    failed: 0
    skipped: 0
    imdsv1_instances: 2
    launch_template_versions_created: 1
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_gateway import AutoScalingGateway
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import module_warn
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import AwsCallError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import PlanningError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import RollError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.metadata_options_plan import SWITCH_CHOICES
from ansible_collections.fleetkeeper.aws.plugins.module_utils.metadata_options_plan import TOKENS_CHOICES
from ansible_collections.fleetkeeper.aws.plugins.module_utils.metadata_options_roll import MetadataRoller
from ansible_collections.fleetkeeper.aws.plugins.module_utils.metadata_options_roll import MetadataRollOptions


def argument_spec():
    return dict(
        names=dict(type="list", elements="str", aliases=["asg_names"]),
        tag_filters=dict(type="dict"),
        metadata_options=dict(
            type="dict", required=True,
            options=dict(
                http_tokens=dict(type="str", choices=list(TOKENS_CHOICES)),
                http_put_response_hop_limit=dict(type="int"),
                http_endpoint=dict(type="str", choices=list(SWITCH_CHOICES)),
                instance_metadata_tags=dict(type="str", choices=list(SWITCH_CHOICES)),
            ),
        ),
        **MetadataRollOptions.argument_spec(),  # imdsv1_window_days, force and the roll-out settings, with defaults
    )


def exit_with(module, result):
    """Exit with the roller's result: failed when a group failed or was refused."""
    diff = result.pop("diff")
    if module._diff:
        result["diff"] = diff
    stopped = [g for g in result["groups"] if g["status"] in ("failed", "refused")]
    if stopped:
        done = [g["name"] for g in result["groups"] if g["status"] not in ("failed", "refused")]
        module.fail_json(
            msg=f"{len(stopped)} of {len(result['groups'])} Auto Scaling group(s) not done: "
            + "; ".join(g["error"] for g in stopped)
            + (f". Finished: {', '.join(done)}" if done else ""),
            **result,
        )
    module.exit_json(**result)


def main():
    module = AnsibleAWSModule(
        argument_spec=argument_spec(),
        required_one_of=[["names", "tag_filters"]],
        supports_check_mode=True,
    )
    params = module.params
    try:
        options = MetadataRollOptions.from_params(params, check_mode=module.check_mode)
    except RollError as exc:
        module.fail_json(msg=str(exc))

    retry = AWSRetry.jittered_backoff(retries=8, delay=1, max_delay=20)
    pool = {"max_pool_connections": options.max_concurrency + 4}
    ec2 = module.client("ec2", retry_decorator=retry, config=pool)
    autoscaling = module.client("autoscaling", retry_decorator=retry, config=pool)

    def cloudwatch():  # made only when an instance's IMDSv1 use must be read
        return module.client("cloudwatch", retry_decorator=retry, config=pool)

    roller = MetadataRoller(AutoScalingGateway(ec2, autoscaling, cloudwatch=cloudwatch), options, warn=module_warn(module))
    try:
        result = roller.run(names=params["names"], tag_filters=params["tag_filters"])
    except PlanningError as exc:
        module.fail_json(msg=str(exc), changed=False, groups=exc.groups, refused_groups=[],
                         failed_groups=[g["name"] for g in exc.groups if g["status"] == "failed"])
    except AwsCallError as exc:  # the error code and request id go into the result
        module.fail_json_aws(exc.original, msg=f"{exc.action} failed: nothing was changed", changed=False,
                             groups=[], refused_groups=[], failed_groups=[])
    except RollError as exc:
        module.fail_json(msg=str(exc), changed=False, groups=[], refused_groups=[], failed_groups=[])
    exit_with(module, result)


if __name__ == "__main__":
    main()

# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Roll instance metadata options (IMDSv2) onto Auto Scaling groups: the rolling half (orchestration).

:class:`MetadataRoller` is a :class:`GroupRoller` (``instance_profile_roll.py``): the group selection,
launch template reading and version rolling are that class's. It adds the instances' side: their
current options, the IMDSv1 users (CloudWatch ``MetadataNoToken``), the refusal of groups that still
have such users, and the change of each instance's options in a bounded thread pool. Every AWS call
(batched ``DescribeInstances``, ``GetMetricData``, ``ModifyInstanceMetadataOptions``) goes through the
gateway (``autoscaling_gateway.py``). :class:`MetadataRollOptions` is the task's settings.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import ClassVar

from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import AwsCallError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import InputError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import RollError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import in_service
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_roll import GroupRoller
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_roll import RollOptions
from ansible_collections.fleetkeeper.aws.plugins.module_utils.metadata_options_plan import (
    ACTION_MODIFY, WINDOW_DAYS_RANGE, MetadataChange, build_diff, desired_options, plan_instance, refusal_message,
    summarise, tightens_tokens,
)


@dataclasses.dataclass(frozen=True)
class MetadataRollOptions(RollOptions):
    """What the metadata options task asks for (``desired``: API fields, see ``desired_options``)."""

    PARAMS: ClassVar[dict] = dict(RollOptions.PARAMS, **{
        "window_days": ("imdsv1_window_days", {"type": "int"}),
        "force": ("force", {"type": "bool"}),
    })

    desired: dict = dataclasses.field(default_factory=dict)
    window_days: int = 14
    force: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not self.desired:
            raise InputError("metadata_options sets nothing")
        low, high = WINDOW_DAYS_RANGE
        if not low <= self.window_days <= high:
            raise InputError(f"imdsv1_window_days must be between {low} and {high}")

    @classmethod
    def from_params(cls, params, check_mode=False, **derived):
        return super().from_params(params, check_mode, desired=desired_options(params["metadata_options"]), **derived)


class MetadataRoller(GroupRoller):
    """Applies metadata options to a set of Auto Scaling groups. The gateway's ``cloudwatch`` is best a
    function that makes the client when it is first needed (a run with no instance to check makes none:
    loading a client's service model is a noticeable part of a no-change run). ``now`` (a callable
    returning an aware datetime) is injectable for tests."""

    def __init__(self, gateway, options, now=None, **kwargs):
        super().__init__(gateway, options, **kwargs)
        self.now = now or (lambda: datetime.datetime.now(datetime.timezone.utc))

    # --- whole run: named steps ----------------------------------------------
    def run(self, names=None, tag_filters=None):
        """Read everything and refuse what must be refused before any change, then apply."""
        groups = self.find_groups(names, tag_filters)
        results = {g["AutoScalingGroupName"]: self._new_result(g) for g in groups}
        change = MetadataChange(self.options.desired)
        refs_by_group, templates = {}, {}
        if self.options.manage_launch_template:
            refs_by_group, templates = self._read_templates(groups, results)
        options = self.read_instance_options(groups, results)
        self._find_v1_users(groups, options, results)
        if self.options.manage_launch_template:
            self._roll_templates(groups, refs_by_group, templates, change, results)
        if self.options.manage_instances:
            self._roll_instances(groups, options, results)
        return self._report(results)

    def _new_result(self, group):
        result = super()._new_result(group)
        result["imdsv1_instances"] = []
        return result

    # --- reading ----------------------------------------------------------
    def read_instance_options(self, groups, results):
        """{instance id: MetadataOptions} of the groups' InService instances (batched, batches concurrently)."""
        instance_ids = []
        for group in groups:
            ready, skipped = in_service(group)
            results[group["AutoScalingGroupName"]]["skipped_instances"] = skipped
            instance_ids.extend(ready)
        return self.gateway.metadata_options(instance_ids, self.options.max_concurrency)

    def read_v1_calls(self, instance_ids):
        """{instance id: successful IMDSv1 calls over the window} from CloudWatch (MetadataNoToken, Sum)."""
        end = self.now().replace(second=0, microsecond=0)
        start = end - datetime.timedelta(days=self.options.window_days)
        return self.gateway.v1_calls(instance_ids, start, end, self.options.max_concurrency)

    def _find_v1_users(self, groups, options, results):
        """IMDSv1 users of every group that would stop answering them (and, in check mode, of every group
        still answering them); groups with users are refused (unless ``force``)."""
        desired = self.options.desired
        to_check = {}
        for group in groups:
            name = group["AutoScalingGroupName"]
            if results[name]["status"] != "ok":
                continue
            ready, _skipped = in_service(group)
            for instance_id in ready:
                current = options.get(instance_id)
                if current is None:
                    continue  # gone since DescribeAutoScalingGroups
                if tightens_tokens(current, desired) or (
                        self.options.check_mode and current.get("HttpTokens") != "required"):
                    to_check[instance_id] = name
        if not to_check:
            return
        calls = self.read_v1_calls(sorted(to_check))
        for instance_id in sorted(calls):
            if calls[instance_id] > 0:
                results[to_check[instance_id]]["imdsv1_instances"].append(
                    {"instance_id": instance_id, "calls": calls[instance_id]})
        if desired.get("HttpTokens") != "required":
            return
        for result in results.values():
            users = result["imdsv1_instances"]
            if not users:
                continue
            if self.options.force:
                self.warn(f"Auto Scaling group {result['name']!r}: requiring IMDSv2 tokens although "
                          f"{len(users)} instance(s) made IMDSv1 calls (force: true)")
                continue
            result["status"] = "refused"
            result["error"] = refusal_message(result["name"], users, self.options.window_days)

    # --- changing instances -------------------------------------------------
    def _roll_instances(self, groups, options, results):
        work = []
        for group in groups:
            result = results[group["AutoScalingGroupName"]]
            if result["status"] not in ("ok",):
                continue
            ready, _skipped = in_service(group)
            for instance_id in ready:
                if instance_id not in options:
                    result["skipped_instances"].append({"instance_id": instance_id, "lifecycle_state": "gone"})
                    continue
                plan = plan_instance(instance_id, options[instance_id], self.options.desired)
                result["instances"].append(plan)
                if plan["action"] == ACTION_MODIFY:
                    work.append((result, plan))
        if not self.options.check_mode and work:
            self._map(lambda item: self._apply_instance(item[1]), work)
        self._settle_instances(results, work)

    def _apply_instance(self, plan):
        try:
            self.gateway.modify_metadata_options(plan["instance_id"], plan["request"])
            plan["done"] = True
        except AwsCallError as exc:
            plan["error"] = str(exc)
            plan["done"] = False

    # --- report -------------------------------------------------------------
    def _report(self, results):
        ordered = [results[name] for name in sorted(results)]
        for result in ordered:
            if result["status"] == "ok":
                result["status"] = "changed" if result["changed"] else "ok"
            for instance in result["instances"]:
                instance.pop("request", None)
        users = [dict(u, group=r["name"]) for r in ordered for u in r["imdsv1_instances"]]
        if users and self.options.desired.get("HttpTokens") != "required":
            self.warn(f"{len(users)} instance(s) made IMDSv1 calls in the last {self.options.window_days} days: "
                      + ", ".join(u["instance_id"] for u in users[:20]) + (" ..." if len(users) > 20 else ""))
        return {
            "changed": any(r["changed"] for r in ordered),
            "metadata_options": dict(self.options.desired),
            "groups": ordered,
            "summary": summarise(ordered),
            "imdsv1_instances": users,
            "imdsv1_window_days": self.options.window_days,
            "refused_groups": [r["name"] for r in ordered if r["status"] == "refused"],
            "failed_groups": [r["name"] for r in ordered if r["status"] == "failed"],
            "diff": build_diff(ordered),
        }


__all__ = ["MetadataRollOptions", "MetadataRoller", "RollError"]

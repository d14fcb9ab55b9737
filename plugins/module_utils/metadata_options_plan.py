# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Roll instance metadata options (IMDSv2) onto Auto Scaling groups: the planning half (no API calls).

The module ``fleetkeeper.aws.asg_metadata_options`` shares the group selection and the launch template
roller of ``asg_instance_profile`` (``instance_profile_plan.py`` / ``instance_profile_roll.py``); this file
holds what is particular to metadata options: the desired options, :class:`MetadataChange` (the launch
template side, for ``plan_template_change``), :func:`plan_instance` (ModifyInstanceMetadataOptions or
nothing), the CloudWatch ``MetadataNoToken`` queries that find IMDSv1 users, and the report.
Everything takes plain dictionaries as botocore returns them.
"""

from __future__ import annotations

import copy

from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import InputError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import template_diff

# Module option -> API field (DescribeInstances MetadataOptions, launch template MetadataOptions and
# ModifyInstanceMetadataOptions use the same names).
FIELDS = {
    "http_tokens": "HttpTokens",
    "http_put_response_hop_limit": "HttpPutResponseHopLimit",
    "http_endpoint": "HttpEndpoint",
    "instance_metadata_tags": "InstanceMetadataTags",
}
TOKENS_CHOICES = ("required", "optional")
SWITCH_CHOICES = ("enabled", "disabled")
HOP_LIMIT_RANGE = (1, 64)  # ModifyInstanceMetadataOptions: "Possible values: Integers from 1 to 64"
REQUIRED = "required"

# CloudWatch: the metric counting successful IMDSv1 calls (basic monitoring, per InstanceId).
METRIC_NAMESPACE = "AWS/EC2"
METRIC_NAME = "MetadataNoToken"
METRIC_QUERIES_PER_CALL = 500  # GetMetricData MetricDataQueries maximum
WINDOW_DAYS_RANGE = (1, 455)  # CloudWatch keeps one-hour data points for 455 days

ACTION_NONE = "none"
ACTION_MODIFY = "modify"


def desired_options(params):
    """The API fields of the options given (``None`` means "leave alone"); at least one is required."""
    desired = {}
    for option, field in FIELDS.items():
        value = (params or {}).get(option)
        if value is None:
            continue
        if option == "http_put_response_hop_limit":
            low, high = HOP_LIMIT_RANGE
            if not low <= int(value) <= high:
                raise InputError(f"metadata_options.http_put_response_hop_limit must be between {low} and {high}")
            value = int(value)
        elif option == "http_tokens" and value not in TOKENS_CHOICES:
            raise InputError(f"metadata_options.http_tokens must be one of {', '.join(TOKENS_CHOICES)}")
        elif option != "http_tokens" and value not in SWITCH_CHOICES:
            raise InputError(f"metadata_options.{option} must be one of {', '.join(SWITCH_CHOICES)}")
        desired[field] = value
    if not desired:
        raise InputError("metadata_options sets nothing: give at least one of " + ", ".join(FIELDS))
    return desired


def subset(options, keys):
    """The ``keys`` of ``options`` (a MetadataOptions structure, or None) as reported."""
    options = options or {}
    return {key: options.get(key) for key in keys}


class MetadataChange:
    """The launch template side: ``MetadataOptions`` holding the desired fields.

    A template without ``MetadataOptions`` (or without one of the fields) gets a version that sets them:
    what such a template means depends on the AMI and the account's defaults, so it is made explicit.
    The new version is made from the followed version with ``SourceVersion`` and only ``MetadataOptions``
    sent, merged with the fields the template already had (``HttpProtocolIpv6`` and others stay)."""

    report_key = "metadata_options"

    def __init__(self, desired):
        self.desired = dict(desired)

    def current(self, data):
        options = (data or {}).get("MetadataOptions")
        return subset(options, self.desired) if options else None

    def satisfied(self, data):
        options = (data or {}).get("MetadataOptions") or {}
        return all(options.get(key) == value for key, value in self.desired.items())

    def merged(self, data):
        options = copy.deepcopy((data or {}).get("MetadataOptions") or {})
        options.update(self.desired)
        return options

    def full_data(self, data):
        result = copy.deepcopy(data or {})
        result["MetadataOptions"] = self.merged(data)
        return result

    def request(self, base, full):
        return {"SourceVersion": str(base), "LaunchTemplateData": {"MetadataOptions": full["MetadataOptions"]}}

    def description(self, full):
        options = full["MetadataOptions"]
        return "fleetkeeper.aws.asg_metadata_options: " + ", ".join(
            f"{key}={options[key]}" for key in sorted(self.desired))


def plan_instance(instance_id, current, desired):
    """What one InService instance needs, from its DescribeInstances ``MetadataOptions`` (``current``).

    ``request`` carries all four managed fields, the desired ones and the instance's current others, so
    that nothing else moves whatever an endpoint does with a field left out."""
    current = current or {}
    wrong = {key: value for key, value in desired.items() if current.get(key) != value}
    plan = {
        "instance_id": instance_id,
        "action": ACTION_MODIFY if wrong else ACTION_NONE,
        "metadata_options_before": subset(current, desired),
        "metadata_options_after": dict(desired) if wrong else subset(current, desired),
        "state": current.get("State"),
    }
    if wrong:
        request = {"InstanceId": instance_id}
        for field in FIELDS.values():
            value = desired.get(field, current.get(field))
            if value is not None:
                request[field] = value
        plan["request"] = request
    return plan


def tightens_tokens(current, desired):
    """True when the instance or template answers IMDSv1 now and would stop (tokens become required)."""
    return desired.get("HttpTokens") == REQUIRED and (current or {}).get("HttpTokens") != REQUIRED


def metric_queries(instance_ids, period):
    """GetMetricData queries, one per instance (Ids ``i0``...), summing MetadataNoToken over ``period``."""
    return [
        {
            "Id": f"i{index}",
            "MetricStat": {
                "Metric": {"Namespace": METRIC_NAMESPACE, "MetricName": METRIC_NAME,
                           "Dimensions": [{"Name": "InstanceId", "Value": instance_id}]},
                "Period": period,
                "Stat": "Sum",
            },
            "ReturnData": True,
        }
        for index, instance_id in enumerate(instance_ids)
    ]


def v1_calls(instance_ids, metric_results):
    """{instance id: IMDSv1 calls} from GetMetricData results of :func:`metric_queries` (all pages)."""
    calls = {instance_id: 0 for instance_id in instance_ids}
    for result in metric_results:
        index = int(result["Id"][1:])
        calls[instance_ids[index]] += int(sum(result.get("Values") or ()))
    return calls


def refusal_message(name, users, window_days):
    shown = ", ".join(f"{u['instance_id']} ({u['calls']} calls)" for u in users[:10])
    more = f" and {len(users) - 10} more" if len(users) > 10 else ""
    return (
        f"Auto Scaling group {name!r}: not requiring IMDSv2 tokens, {len(users)} instance(s) made IMDSv1 calls "
        f"in the last {window_days} days (CloudWatch {METRIC_NAMESPACE} {METRIC_NAME}): {shown}{more}. "
        "Update the software that calls the metadata service without a token, then run again, "
        "or set force: true to require tokens anyway"
    )


def summarise(groups):
    summary = {
        "groups": len(groups),
        "groups_changed": 0,
        "groups_failed": 0,
        "groups_refused": 0,
        "instances": 0,
        "modified": 0,
        "unchanged": 0,
        "failed": 0,
        "skipped": 0,
        "imdsv1_instances": 0,
        "launch_template_versions_created": 0,
    }
    for group in groups:
        summary["groups_changed"] += 1 if group.get("changed") else 0
        summary["groups_failed"] += 1 if group.get("status") == "failed" else 0
        summary["groups_refused"] += 1 if group.get("status") == "refused" else 0
        summary["skipped"] += len(group.get("skipped_instances") or [])
        summary["imdsv1_instances"] += len(group.get("imdsv1_instances") or [])
        summary["launch_template_versions_created"] += sum(
            1 for t in group.get("launch_templates") or [] if t.get("created_version"))
        for instance in group.get("instances") or []:
            summary["instances"] += 1
            if instance.get("error"):
                summary["failed"] += 1
            elif instance["action"] == ACTION_MODIFY and instance.get("done", True):
                summary["modified"] += 1
            elif instance["action"] == ACTION_NONE:
                summary["unchanged"] += 1
    return summary


def build_diff(groups):
    """Ansible diff: per group, the launch templates and instances whose metadata options change."""
    before, after = {}, {}
    for group in groups:
        b, a = {}, {}
        template_diff(group, "metadata_options", "metadata_options", b, a)
        changes = [i for i in group.get("instances") or [] if i["action"] == ACTION_MODIFY and not i.get("error")]
        if changes:
            b["instances"] = {i["instance_id"]: i["metadata_options_before"] for i in changes}
            a["instances"] = {i["instance_id"]: i["metadata_options_after"] for i in changes}
        if group.get("instance_refresh"):
            b["instance_refresh"] = None
            a["instance_refresh"] = group["instance_refresh"]
        if b or a:
            before[group["name"]] = b
            after[group["name"]] = a
    return {"before": before, "after": after}

# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Select Auto Scaling groups by name and/or tags: one implementation for every module that takes
``names`` and ``tag_filters`` (asg_instance_profile, asg_lifecycle_hook).

``autoscaling`` is a boto3 client, usually amazon.aws's retrying wrapper (calls
pass ``aws_retry=True``). API errors propagate unchanged; a selection that names
missing groups or matches nothing raises :class:`GroupSelectionError` with a
message that says what to check.
"""

from __future__ import annotations

ASG_BATCH_SIZE = 100  # DescribeAutoScalingGroups: names per call and MaxRecords


class GroupSelectionError(Exception):
    """The names or tag filters select a group that does not exist, or none at all."""


def chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def tag_filters_to_api(tag_filters):
    """``{key: value | [values] | "*" | None}`` -> DescribeAutoScalingGroups ``Filters``."""
    filters = []
    for key, value in (tag_filters or {}).items():
        values = value if isinstance(value, list) else [value]
        if values in ([None], ["*"]):
            filters.append({"Name": "tag-key", "Values": [key]})
        else:
            filters.append({"Name": f"tag:{key}", "Values": [str(v) for v in values]})
    return filters


def describe_pages(method, key, params):
    """Every item under ``key`` across the NextToken pages of ``method(**params)``."""
    token = None
    while True:
        call = dict(params)
        if token:
            call["NextToken"] = token
        page = method(aws_retry=True, **call)
        yield from page.get(key) or []
        token = page.get("NextToken")
        if not token:
            return


def find_groups(autoscaling, names=None, tag_filters=None):
    """The groups named and/or matching ``tag_filters`` (both: named and matching), sorted by name."""
    filters = tag_filters_to_api(tag_filters)
    groups = {}
    name_batches = list(chunks(sorted(set(names or [])), ASG_BATCH_SIZE)) if names else [None]
    for batch in name_batches:
        params = {"MaxRecords": ASG_BATCH_SIZE}
        if batch:
            params["AutoScalingGroupNames"] = batch
        if filters:
            params["Filters"] = filters
        for group in describe_pages(autoscaling.describe_auto_scaling_groups, "AutoScalingGroups", params):
            groups[group["AutoScalingGroupName"]] = group
    if names:
        missing = sorted(set(names) - set(groups))
        if missing and not filters:
            raise GroupSelectionError(
                f"Auto Scaling group(s) not found: {', '.join(missing)}: check the names and region")
        if missing:
            # The name may exist without the tags: say both.
            raise GroupSelectionError(f"Auto Scaling group(s) {', '.join(missing)} not found or not matching tag_filters")
    if not groups:
        raise GroupSelectionError(f"no Auto Scaling group matches tag_filters {tag_filters}: check the tags and region")
    return [groups[name] for name in sorted(groups)]

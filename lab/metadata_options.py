# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Readers and metric feeders for the metadata options (IMDSv2) tests, demo and benchmark."""

from __future__ import annotations

import datetime

FIELDS = ("HttpTokens", "HttpPutResponseHopLimit", "HttpEndpoint", "InstanceMetadataTags")


def options_of_instances(ec2, instance_ids):
    """{instance id: {HttpTokens, HttpPutResponseHopLimit, HttpEndpoint, InstanceMetadataTags}}."""
    found = {}
    paginator = ec2.get_paginator("describe_instances")
    for page in paginator.paginate(InstanceIds=list(instance_ids)):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                options = instance.get("MetadataOptions") or {}
                found[instance["InstanceId"]] = {k: options.get(k) for k in FIELDS}
    return found


def template_data(ec2, autoscaling, name):
    """(the group's Version spec, the LaunchTemplateData of the version it resolves to)."""
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    spec = group.get("LaunchTemplate") or group["MixedInstancesPolicy"]["LaunchTemplate"]["LaunchTemplateSpecification"]
    version = spec.get("Version") or "$Default"
    record = ec2.describe_launch_template_versions(LaunchTemplateId=spec["LaunchTemplateId"],
                                                   Versions=[version])["LaunchTemplateVersions"][0]
    return spec.get("Version"), record["LaunchTemplateData"]


def put_v1_calls(cloudwatch, instance_id, calls, days_ago=1.0):
    """Record ``calls`` IMDSv1 calls of an instance ``days_ago`` days back, as EC2 publishes them."""
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days_ago)
    cloudwatch.put_metric_data(Namespace="AWS/EC2", MetricData=[{
        "MetricName": "MetadataNoToken", "Dimensions": [{"Name": "InstanceId", "Value": instance_id}],
        "Timestamp": when, "Value": float(calls), "Unit": "Count"}])

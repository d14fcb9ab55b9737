# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The AWS side of the Auto Scaling roll-outs: every EC2, Auto Scaling, IAM and CloudWatch call they make.

:class:`AutoScalingGateway` reads the groups, their launch templates and instances, writes template
versions, group settings and instance refreshes, and reads and writes instance profile associations
and instance metadata options. It pages (``aws_calls.pages``), batches (``aws_calls.chunks``, batches
concurrently through :func:`bounded_map`) and turns botocore's errors into this collection's
(:class:`AwsCallError`, whose ``code`` is the AWS error code; :class:`GroupError`, :class:`InputError`).
It decides nothing: the rollers (``instance_profile_roll.py``, ``metadata_options_roll.py``) plan,
retry and fall back.

The clients are boto3 clients, usually amazon.aws's retrying wrappers: every call passes
``aws_retry=True``. ``iam`` is needed by the instance profile roll-out only; ``cloudwatch`` is a client
or a function that makes one when it is first needed (a run with nothing to ask CloudWatch makes none).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

try:
    import botocore.exceptions

    AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
except ImportError:  # AnsibleAWSModule reports the missing SDK
    AWS_ERRORS = ()

from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_groups import GroupSelectionError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_groups import find_groups as select_groups
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import chunks
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_code
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_message
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import pages
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import (
    ASSOCIATION_BATCH_SIZE, ASSOCIATION_NOT_FOUND, ASSOCIATION_PAGE_SIZE, PROFILE_NOT_FOUND_CODES,
    TEMPLATE_NOT_FOUND_CODES, AwsCallError, GroupError, InputError,
)
from ansible_collections.fleetkeeper.aws.plugins.module_utils.metadata_options_plan import (
    METRIC_QUERIES_PER_CALL, metric_queries, v1_calls,
)

INSTANCE_BATCH_SIZE = 200  # instance ids per DescribeInstances instance-id filter (missing ids are no error there)
INSTANCE_PAGE_SIZE = 1000  # DescribeInstances MaxResults maximum
REFRESH_IN_PROGRESS = "InstanceRefreshInProgress"


def bounded_map(func, items, max_concurrency):
    """``[func(item) for item in items]``, in a thread pool of at most ``max_concurrency`` threads."""
    items = list(items)
    if len(items) <= 1 or max_concurrency == 1:
        return [func(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(max_concurrency, len(items))) as pool:
        return list(pool.map(func, items))


def _call(action, method, **params):
    """``method(aws_retry=True, **params)``; a failure is an AwsCallError naming ``action``."""
    try:
        return method(aws_retry=True, **params)
    except AWS_ERRORS as exc:
        raise AwsCallError(action, exc) from exc


def _items(method, key, action, params):
    """Every item under ``key`` of every page; a failed call is an AwsCallError naming ``action``."""
    try:
        for page in pages(method, params, aws_retry=True):
            yield from page.get(key) or []
    except AWS_ERRORS as exc:
        raise AwsCallError(action, exc) from exc


class AutoScalingGateway:
    """The roll-outs' EC2 / Auto Scaling / IAM / CloudWatch calls (see the file's docstring)."""

    def __init__(self, ec2, autoscaling, iam=None, cloudwatch=None):
        self.ec2 = ec2
        self.autoscaling = autoscaling
        self.iam = iam
        self._cloudwatch = cloudwatch

    @property
    def cloudwatch(self):
        if not hasattr(self._cloudwatch, "get_metric_data"):
            self._cloudwatch = self._cloudwatch()
        return self._cloudwatch

    @cloudwatch.setter
    def cloudwatch(self, client):
        self._cloudwatch = client

    # --- Auto Scaling groups ------------------------------------------------
    def find_groups(self, names=None, tag_filters=None):
        """Describe the groups named and/or matching the tag filters; unknown names are an InputError."""
        try:
            return select_groups(self.autoscaling, names, tag_filters)
        except GroupSelectionError as exc:
            raise InputError(str(exc)) from exc
        except AWS_ERRORS as exc:
            raise AwsCallError("DescribeAutoScalingGroups", exc) from exc

    def update_group(self, name, request):
        _call(f"UpdateAutoScalingGroup {name}", self.autoscaling.update_auto_scaling_group, **request)

    def start_instance_refresh(self, name, preferences=None):
        """The new refresh's id, or None when one is already in progress (none started)."""
        params = {"AutoScalingGroupName": name}
        if preferences:
            params["Preferences"] = preferences
        try:
            answer = _call(f"StartInstanceRefresh {name}", self.autoscaling.start_instance_refresh, **params)
        except AwsCallError as exc:
            if exc.code == REFRESH_IN_PROGRESS:
                return None
            raise
        return answer.get("InstanceRefreshId")

    # --- launch templates ---------------------------------------------------
    def template_versions(self, ref, versions):
        """The LaunchTemplateVersions records of ``versions`` of the template ``ref`` names (id or name).

        A template that does not exist (or answers no version) is a GroupError saying what to fix."""
        params = {"Versions": versions}
        if ref["id"]:
            params["LaunchTemplateId"] = ref["id"]
        else:
            params["LaunchTemplateName"] = ref["name"]
        label = ref["name"] or ref["id"]
        try:
            records = self.ec2.describe_launch_template_versions(aws_retry=True, **params)["LaunchTemplateVersions"]
        except AWS_ERRORS as exc:
            if error_code(exc) in TEMPLATE_NOT_FOUND_CODES:
                raise GroupError(
                    f"launch template {label} (versions {', '.join(versions)}) not found: "
                    f"{error_message(exc) or error_code(exc)}. Point the group at an existing launch template"
                ) from exc
            raise AwsCallError(f"DescribeLaunchTemplateVersions {label}", exc) from exc
        if not records:
            raise GroupError(f"launch template {label} not found. Point the group at an existing launch template")
        return records

    def create_template_version(self, template, description, request):
        """Create a version of ``template`` (a TemplateState); returns its number."""
        answer = _call(f"CreateLaunchTemplateVersion {template.name or template.id}",
                       self.ec2.create_launch_template_version, LaunchTemplateId=template.id,
                       VersionDescription=description, **request)
        return int(answer["LaunchTemplateVersion"]["VersionNumber"])

    def set_default_version(self, template, number):
        _call(f"ModifyLaunchTemplate {template.name or template.id}", self.ec2.modify_launch_template,
              LaunchTemplateId=template.id, DefaultVersion=str(number))

    # --- IAM instance profiles ----------------------------------------------
    def instance_profile(self, name):
        """The GetInstanceProfile record of ``name``, or None when there is no such profile."""
        try:
            return _call(f"GetInstanceProfile {name}", self.iam.get_instance_profile,
                         InstanceProfileName=name)["InstanceProfile"]
        except AwsCallError as exc:
            if exc.code in PROFILE_NOT_FOUND_CODES:
                return None
            raise

    def wait_for_instance_profile(self, name, delay, attempts):
        """Wait (IAM's waiter) until the profile is visible; its record, or None if it never appeared."""
        try:
            waiter = self.iam.get_waiter("instance_profile_exists")
            waiter.wait(InstanceProfileName=name, WaiterConfig={"Delay": delay, "MaxAttempts": attempts})
        except AWS_ERRORS as exc:
            # botocore's WaiterError: "Max attempts exceeded" means the profile never appeared;
            # anything else (access denied, a terminal failure) is an error of its own.
            if "Max attempts exceeded" in str(exc) or error_code(exc) in PROFILE_NOT_FOUND_CODES:
                return None
            raise AwsCallError(f"waiting for instance profile {name}", exc) from exc
        return _call(f"GetInstanceProfile {name}", self.iam.get_instance_profile,
                     InstanceProfileName=name)["InstanceProfile"]

    # --- instance profile associations --------------------------------------
    def associations(self, instance_ids, max_concurrency):
        """{instance id: [association records]} for the instances, batched, batches concurrently."""
        found = {i: [] for i in instance_ids}

        def one(batch):
            params = {"Filters": [{"Name": "instance-id", "Values": batch}], "MaxResults": ASSOCIATION_PAGE_SIZE}
            return list(_items(self.ec2.describe_iam_instance_profile_associations, "IamInstanceProfileAssociations",
                               "DescribeIamInstanceProfileAssociations", params))

        for records in bounded_map(one, list(chunks(list(instance_ids), ASSOCIATION_BATCH_SIZE)), max_concurrency):
            for record in records:
                found.setdefault(record["InstanceId"], []).append(record)
        return found

    def instance_associations(self, instance_id):
        """The association records of one instance."""
        params = {"Filters": [{"Name": "instance-id", "Values": [instance_id]}]}
        return list(_items(self.ec2.describe_iam_instance_profile_associations, "IamInstanceProfileAssociations",
                           "DescribeIamInstanceProfileAssociations", params))

    def associate_profile(self, instance_id, arn):
        """Associate the profile ``arn`` with the instance; returns the association id."""
        answer = _call(f"AssociateIamInstanceProfile {instance_id}", self.ec2.associate_iam_instance_profile,
                       InstanceId=instance_id, IamInstanceProfile={"Arn": arn})
        return answer["IamInstanceProfileAssociation"]["AssociationId"]

    def replace_profile(self, instance_id, association_id, arn):
        """Replace the association's profile with ``arn``; returns the (new) association id."""
        answer = _call(f"ReplaceIamInstanceProfileAssociation {instance_id}",
                       self.ec2.replace_iam_instance_profile_association, AssociationId=association_id,
                       IamInstanceProfile={"Arn": arn})
        return answer["IamInstanceProfileAssociation"]["AssociationId"]

    def disassociate_profile(self, instance_id, association_id):
        """Remove the association; one already gone is no error."""
        try:
            _call(f"DisassociateIamInstanceProfile {instance_id}", self.ec2.disassociate_iam_instance_profile,
                  AssociationId=association_id)
        except AwsCallError as exc:
            if exc.code != ASSOCIATION_NOT_FOUND:
                raise

    # --- instance metadata options --------------------------------------------
    def metadata_options(self, instance_ids, max_concurrency):
        """{instance id: MetadataOptions} of the instances that exist (batched, batches concurrently)."""
        def one(batch):
            params = {"Filters": [{"Name": "instance-id", "Values": batch}], "MaxResults": INSTANCE_PAGE_SIZE}
            found = {}
            for reservation in _items(self.ec2.describe_instances, "Reservations", "DescribeInstances", params):
                for instance in reservation.get("Instances") or []:
                    found[instance["InstanceId"]] = instance.get("MetadataOptions") or {}
            return found

        options = {}
        for found in bounded_map(one, list(chunks(list(instance_ids), INSTANCE_BATCH_SIZE)), max_concurrency):
            options.update(found)
        return options

    def modify_metadata_options(self, instance_id, request):
        _call(f"ModifyInstanceMetadataOptions {instance_id}", self.ec2.modify_instance_metadata_options, **request)

    def v1_calls(self, instance_ids, start, end, max_concurrency):
        """{instance id: successful IMDSv1 calls from ``start`` to ``end``} (CloudWatch MetadataNoToken, Sum;
        METRIC_QUERIES_PER_CALL instances per GetMetricData, calls concurrently)."""
        period = int((end - start).total_seconds())

        def one(batch):
            request = {"MetricDataQueries": metric_queries(batch, period), "StartTime": start, "EndTime": end}
            return v1_calls(batch, list(_items(self.cloudwatch.get_metric_data, "MetricDataResults",
                                               "GetMetricData", request)))

        calls = {}
        for found in bounded_map(one, list(chunks(list(instance_ids), METRIC_QUERIES_PER_CALL)), max_concurrency):
            calls.update(found)
        return calls

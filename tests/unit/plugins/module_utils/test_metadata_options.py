# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planning of the metadata options roll-out (metadata_options_plan.py), the metadata roller against
botocore's Stubber, and the test endpoint's SourceVersion emulation against botocore's service model."""

from __future__ import annotations

import datetime
import urllib.parse

import boto3
import pytest
from botocore.stub import ANY
from botocore.stub import Stubber

from ansible_collections.fleetkeeper.aws.plugins.module_utils import instance_profile_plan as ip
from ansible_collections.fleetkeeper.aws.plugins.module_utils import metadata_options_plan as mo
from ansible_collections.fleetkeeper.aws.plugins.module_utils import metadata_options_roll as roll
from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_gateway import AutoScalingGateway
from lab import launch_templates

REQUIRED = {"HttpTokens": "required", "HttpPutResponseHopLimit": 1}
V1 = {"State": "applied", "HttpTokens": "optional", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled",
      "HttpProtocolIpv6": "disabled", "InstanceMetadataTags": "disabled"}


def template(data_by_version, latest=None, default=1):
    versions = dict(data_by_version)
    return ip.TemplateState("lt-1", "web-lt", latest or max(versions), default, versions)


def ref(version):
    return {"source": "LaunchTemplate", "id": "lt-1", "name": "web-lt", "version": version}


# --- desired options -----------------------------------------------------------------------

def test_desired_options_keep_only_what_is_given():
    assert mo.desired_options({"http_tokens": "required", "http_put_response_hop_limit": 2,
                               "http_endpoint": None, "instance_metadata_tags": None}) == {
        "HttpTokens": "required", "HttpPutResponseHopLimit": 2}


@pytest.mark.parametrize("params, message", [
    ({}, "at least one"),
    ({"http_tokens": None}, "at least one"),
    ({"http_put_response_hop_limit": 0}, "between 1 and 64"),
    ({"http_put_response_hop_limit": 65}, "between 1 and 64"),
    ({"http_tokens": "sometimes"}, "http_tokens"),
    ({"http_endpoint": "on"}, "http_endpoint"),
])
def test_desired_options_refuse_bad_values(params, message):
    with pytest.raises(ip.InputError, match=message):
        mo.desired_options(params)


# --- launch templates ----------------------------------------------------------------------

def test_template_without_options_gets_a_version_from_the_followed_one():
    state = template({1: {"ImageId": "ami-1"}, 2: {"ImageId": "ami-2"}}, default=1)
    plan = ip.plan_template_change(ref("$Latest"), state, mo.MetadataChange(REQUIRED), ip.VERSION_KEEP)
    assert plan["create_version"]["request"] == {"SourceVersion": "2",
                                                 "LaunchTemplateData": {"MetadataOptions": REQUIRED}}
    assert plan["create_version"]["full_data"] == {"ImageId": "ami-2", "MetadataOptions": REQUIRED}
    assert (plan["metadata_options_before"], plan["metadata_options_after"]) == (None, REQUIRED)
    assert plan["version_after"] == 3 and plan["spec_after"] == "$Latest" and not plan["update_group"]
    assert "HttpTokens=required" in plan["create_version"]["description"]


def test_template_options_are_merged_not_replaced():
    data = {"MetadataOptions": {"HttpTokens": "optional", "HttpProtocolIpv6": "enabled", "HttpPutResponseHopLimit": 2}}
    plan = ip.plan_template_change(ref("1"), template({1: data}), mo.MetadataChange({"HttpTokens": "required"}),
                                   ip.VERSION_KEEP)
    sent = plan["create_version"]["request"]["LaunchTemplateData"]["MetadataOptions"]
    assert sent == {"HttpTokens": "required", "HttpProtocolIpv6": "enabled", "HttpPutResponseHopLimit": 2}
    assert plan["spec_after"] == "2" and plan["update_group"]  # a pinned group is re-pinned


def test_template_that_has_the_options_needs_nothing():
    data = {"MetadataOptions": dict(REQUIRED, HttpEndpoint="enabled")}
    plan = ip.plan_template_change(ref(None), template({1: data}), mo.MetadataChange(REQUIRED), ip.VERSION_KEEP)
    assert not plan["changed"] and plan["create_version"] is None
    assert plan["metadata_options_before"] == plan["metadata_options_after"] == REQUIRED


def test_default_group_moves_the_default_version():
    state = template({1: {}, 2: {}}, default=1)
    plan = ip.plan_template_change(ref("$Default"), state, mo.MetadataChange(REQUIRED), ip.VERSION_KEEP)
    assert plan["create_version"]["request"]["SourceVersion"] == "1"  # the version the group uses, not $Latest
    assert plan["set_default"] and plan["version_after"] == 3


def test_profile_change_still_plans_as_before():
    """plan_template (instance profile) goes through the same plan_template_change."""
    desired = ip.ProfileRef("app", "arn:aws:iam::123456789012:instance-profile/app")
    plan = ip.plan_template(ref("$Latest"), template({1: {"ImageId": "ami-1"}}), desired, "present", ip.VERSION_KEEP)
    assert plan["create_version"]["request"] == {"SourceVersion": "1", "LaunchTemplateData": {
        "IamInstanceProfile": {"Arn": desired.arn}}}
    assert plan["profile_after"] == desired.arn


# --- instances ---------------------------------------------------------------------------------

def test_instance_with_v1_is_modified_with_all_fields_kept():
    plan = mo.plan_instance("i-1", V1, REQUIRED)
    assert plan["action"] == mo.ACTION_MODIFY
    assert plan["request"] == {"InstanceId": "i-1", "HttpTokens": "required", "HttpPutResponseHopLimit": 1,
                               "HttpEndpoint": "enabled", "InstanceMetadataTags": "disabled"}
    assert plan["metadata_options_before"] == {"HttpTokens": "optional", "HttpPutResponseHopLimit": 1}
    assert plan["metadata_options_after"] == REQUIRED


def test_instance_already_right_is_left_alone():
    plan = mo.plan_instance("i-1", dict(V1, HttpTokens="required"), REQUIRED)
    assert plan["action"] == mo.ACTION_NONE and "request" not in plan


def test_only_the_hop_limit_moves():
    plan = mo.plan_instance("i-1", dict(V1, HttpTokens="required"), {"HttpPutResponseHopLimit": 2})
    assert plan["request"]["HttpPutResponseHopLimit"] == 2 and plan["request"]["HttpTokens"] == "required"


def test_tightens_tokens():
    assert mo.tightens_tokens(V1, REQUIRED)
    assert not mo.tightens_tokens(dict(V1, HttpTokens="required"), REQUIRED)
    assert not mo.tightens_tokens(V1, {"HttpTokens": "optional"})
    assert not mo.tightens_tokens(V1, {"HttpPutResponseHopLimit": 2})


# --- CloudWatch ----------------------------------------------------------------------------------

def test_metric_queries_and_sums_across_pages():
    ids = ["i-a", "i-b", "i-c"]
    queries = mo.metric_queries(ids, 14 * 86400)
    assert [q["Id"] for q in queries] == ["i0", "i1", "i2"]
    assert queries[1]["MetricStat"]["Metric"] == {
        "Namespace": "AWS/EC2", "MetricName": "MetadataNoToken", "Dimensions": [{"Name": "InstanceId", "Value": "i-b"}]}
    assert queries[1]["MetricStat"]["Stat"] == "Sum" and queries[1]["MetricStat"]["Period"] == 1209600
    results = [{"Id": "i1", "Values": [3.0, 4.0]}, {"Id": "i2", "Values": []}, {"Id": "i1", "Values": [1.0]}]
    assert mo.v1_calls(ids, results) == {"i-a": 0, "i-b": 8, "i-c": 0}


def test_metric_queries_are_valid_for_botocore():
    """The queries validate against botocore's model of GetMetricData (Ids, Period, 500 per call)."""
    client = boto3.client("cloudwatch", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    with Stubber(client) as stub:
        stub.add_response("get_metric_data", {"MetricDataResults": []},
                          {"MetricDataQueries": ANY, "StartTime": ANY, "EndTime": ANY})
        now = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
        client.get_metric_data(MetricDataQueries=mo.metric_queries([f"i-{n}" for n in range(500)], 86400),
                               StartTime=now - datetime.timedelta(days=1), EndTime=now)


def group(name, ids, template_id="lt-1"):
    return {"AutoScalingGroupName": name, "LaunchTemplate": {"LaunchTemplateId": template_id, "Version": "$Latest"},
            "Instances": [{"InstanceId": i, "LifecycleState": "InService"} for i in ids]}


def stubbed_roller(groups, instances, metric_values, check_mode=False, force=False):
    """A MetadataRoller on Stubber'd clients: DescribeAutoScalingGroups, DescribeInstances, GetMetricData."""
    kwargs = {"region_name": "us-east-1", "aws_access_key_id": "a", "aws_secret_access_key": "b"}
    ec2, autoscaling, cloudwatch = (boto3.client(s, **kwargs) for s in ("ec2", "autoscaling", "cloudwatch"))
    stubs = [Stubber(c) for c in (ec2, autoscaling, cloudwatch)]
    stubs[1].add_response("describe_auto_scaling_groups", {"AutoScalingGroups": [
        dict(g, MinSize=0, MaxSize=9, DesiredCapacity=len(g["Instances"]), DefaultCooldown=300,
             AvailabilityZones=["us-east-1a"], HealthCheckType="EC2", CreatedTime=datetime.datetime(2026, 1, 1),
             Instances=[dict(i, AvailabilityZone="us-east-1a", HealthStatus="Healthy", ProtectedFromScaleIn=False)
                        for i in g["Instances"]])
        for g in groups]}, {"AutoScalingGroupNames": ANY, "MaxRecords": 100})
    stubs[0].add_response("describe_instances", {"Reservations": [{"Instances": [
        {"InstanceId": i, "MetadataOptions": o} for i, o in instances.items()]}]}, {"Filters": ANY, "MaxResults": 1000})
    now = datetime.datetime(2026, 12, 1, 12, 30, 45, tzinfo=datetime.timezone.utc)
    if metric_values is not None:
        # The window: 14 days up to the last whole minute.
        end = datetime.datetime(2026, 12, 1, 12, 30, tzinfo=datetime.timezone.utc)
        stubs[2].add_response("get_metric_data", {"MetricDataResults": [
            {"Id": f"i{n}", "Values": [v] if v else [], "Timestamps": []} for n, v in enumerate(metric_values)]},
            {"MetricDataQueries": ANY, "StartTime": end - datetime.timedelta(days=14), "EndTime": end})
    for stub in stubs:
        stub.activate()

    def aws_retry(client):
        """amazon.aws's wrappers take aws_retry=True; the stubs do not."""
        class Wrapped:  # pylint: disable=too-few-public-methods
            def __getattr__(self, name):
                method = getattr(client, name)

                def call(*args, aws_retry=False, **kwargs):  # pylint: disable=unused-argument
                    return method(*args, **kwargs)
                return call
        return Wrapped()

    options = roll.MetadataRollOptions(desired=REQUIRED, manage_launch_template=False, check_mode=check_mode,
                                       force=force, max_concurrency=1)
    gateway = AutoScalingGateway(aws_retry(ec2), aws_retry(autoscaling), cloudwatch=aws_retry(cloudwatch))
    roller = roll.MetadataRoller(gateway, options, now=lambda: now)
    return roller, stubs


def test_roller_refuses_the_group_with_v1_users_before_any_change():
    instances = {"i-a": V1, "i-b": V1, "i-c": dict(V1, HttpTokens="required")}
    roller, stubs = stubbed_roller([group("one", ["i-a"]), group("two", ["i-b", "i-c"], "lt-2")], instances,
                                   [0, 7], check_mode=True)
    result = roller.run(names=["one", "two"])
    for stub in stubs:
        stub.assert_no_pending_responses()  # i-c (already required) was not asked about
    assert result["refused_groups"] == ["two"]
    assert result["imdsv1_instances"] == [{"instance_id": "i-b", "calls": 7, "group": "two"}]
    by_name = {g["name"]: g for g in result["groups"]}
    assert by_name["two"]["instances"] == [] and "i-b (7 calls)" in by_name["two"]["error"]
    assert by_name["one"]["status"] == "changed"


def test_roller_force_requires_tokens_anyway_with_a_warning():
    roller, _stubs = stubbed_roller([group("two", ["i-b"])], {"i-b": V1}, [7], check_mode=True, force=True)
    result = roller.run(names=["two"])
    assert result["refused_groups"] == [] and result["groups"][0]["status"] == "changed"
    assert roller.warnings and "force: true" in roller.warnings[0]


# --- the test endpoint's SourceVersion emulation ---------------------------------------------------

def test_source_version_emulation_keeps_the_source_fields_the_request_does_not_name():
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    with Stubber(client) as stub:
        stub.add_response("describe_launch_template_versions", {"LaunchTemplateVersions": [{
            "LaunchTemplateId": "lt-1", "VersionNumber": 2, "LaunchTemplateData": {
                "ImageId": "ami-1", "InstanceType": "t3.small", "IamInstanceProfile": {"Arn": "arn:old"},
                "MetadataOptions": {"HttpTokens": "optional"}, "SecurityGroupIds": ["sg-1", "sg-2"]}}]},
            {"LaunchTemplateId": "lt-1", "Versions": ["2"]})
        emulation = launch_templates.SourceVersionEmulation(lambda service, region: client)
        params = {"Action": "CreateLaunchTemplateVersion", "Version": "2016-11-15", "LaunchTemplateId": "lt-1",
                  "SourceVersion": "2", "LaunchTemplateData.MetadataOptions.HttpTokens": "required"}
        body = emulation.before("us-east-1", "CreateLaunchTemplateVersion", params)
    merged = dict(urllib.parse.parse_qsl(body.decode()))
    assert "SourceVersion" not in merged
    assert merged["LaunchTemplateData.MetadataOptions.HttpTokens"] == "required"
    assert merged["LaunchTemplateData.ImageId"] == "ami-1"
    assert merged["LaunchTemplateData.IamInstanceProfile.Arn"] == "arn:old"
    # EC2's query names for lists, as botocore's model serialises them.
    assert merged["LaunchTemplateData.SecurityGroupId.1"] == "sg-1"
    assert emulation.before("us-east-1", "CreateLaunchTemplateVersion", {"LaunchTemplateId": "lt-1"}) is None


def test_cloudwatch_client_is_made_only_when_needed():
    made = []
    roller, _stubs = stubbed_roller([group("one", ["i-a"])], {"i-a": dict(V1, HttpTokens="required")}, None)
    roller.gateway.cloudwatch = lambda: made.append(1)
    result = roller.run(names=["one"])
    assert made == [] and result["changed"] is False

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pure logic of the fleet inventory: records, drift, hostnames, groups, bastion, filters, cache key (the fast path: test_fleet_fast.py)."""

from __future__ import annotations

import datetime

import botocore.session
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import fleet as logic

KNOWN = {"us-east-1", "eu-west-1", "ap-southeast-2"}


# --- configuration -------------------------------------------------------------------------------

def test_regions_are_validated_and_deduplicated():
    assert logic.validate_regions(["us-east-1", "eu-west-1", "us-east-1"], KNOWN) == ["us-east-1", "eu-west-1"]
    with pytest.raises(logic.FleetConfigError, match="'us-eest-1'"):
        logic.validate_regions(["us-east-1", "us-eest-1"], KNOWN)
    with pytest.raises(logic.FleetConfigError, match="no region"):
        logic.validate_regions([], KNOWN)
    with pytest.raises(logic.FleetConfigError, match="'US_EAST_1'"):
        logic.validate_regions(["US_EAST_1"], set())
    assert logic.validate_regions(["xx-new-9"], set()) == ["xx-new-9"]  # unknown list: shape only


def test_hostnames_and_lifecycle_options():
    assert logic.validate_hostnames([]) == logic.DEFAULT_HOSTNAMES
    assert logic.validate_hostnames(["tag:Name", "instance-id"]) == ["tag:Name", "instance-id"]
    for bad in (["bogus"], ["tag:"], [{"name": "x"}], "dns-name"):
        with pytest.raises(logic.FleetConfigError):
            logic.validate_hostnames(bad)
    assert logic.validate_lifecycle_states(["InService"]) == frozenset({"InService"})
    assert logic.validate_lifecycle_states(["InService", "all"]) is None
    with pytest.raises(logic.FleetConfigError):
        logic.validate_lifecycle_states([])


def test_lifecycle_states_outside_auto_scaling_fail_listing_the_valid_ones():
    with pytest.raises(logic.FleetConfigError) as caught:
        logic.validate_lifecycle_states(["Pending:Wait", "Inservice"])
    message = str(caught.value)
    assert "'Inservice' (did you mean 'InService'?)" in message
    assert "Pending:Wait, " in message and "Warmed:Hibernated" in message and "'all'" in message
    with pytest.raises(logic.FleetConfigError, match="'Booting'"):
        logic.validate_lifecycle_states(["Booting"])


def test_lifecycle_states_are_those_of_botocores_model():
    import botocore.session
    model = botocore.session.get_session().get_service_model("autoscaling")
    assert set(logic.LIFECYCLE_STATES) == set(model.shape_for("LifecycleState").enum)


def test_bastion_option():
    assert logic.parse_bastion(None) is None
    parsed = logic.parse_bastion({"tag": "fleetkeeper:role=bastion", "user": "admin", "port": "2222"})
    assert parsed["tag"] == ("fleetkeeper:role", "bastion") and parsed["port"] == 2222
    assert logic.parse_bastion({"tag": "bastion"})["tag"] == ("bastion", None)
    assert logic.parse_bastion({"instance_id": "i-0123456789abcdef0"})["instance_id"] == "i-0123456789abcdef0"
    for bad in ({"user": "admin"}, {"tag": "a=b", "address": "x"}, {"instance_id": "bastion-1"}, {"address": "x", "port": 0},
                {"tag": "=x"}, "bastion.example.com"):
        with pytest.raises(logic.FleetConfigError):
            logic.parse_bastion(bad)
    assert logic.bastion_filters(parsed)[1] == {"Name": "tag:fleetkeeper:role", "Values": ["bastion"]}
    assert logic.bastion_filters(logic.parse_bastion({"tag": "bastion"}))[1] == {"Name": "tag-key", "Values": ["bastion"]}


def test_filters_and_requests():
    assert logic.ec2_filter_list({"tag:Role": ["a", "b"], "instance-type": "t3.micro"}) == [
        {"Name": "tag:Role", "Values": ["a", "b"]},
        {"Name": "instance-type", "Values": ["t3.micro"]},
        {"Name": "instance-state-name", "Values": logic.DEFAULT_INSTANCE_STATES},
    ]
    assert logic.ec2_filter_list({"instance-state-name": "running"}) == [{"Name": "instance-state-name", "Values": ["running"]}]
    with pytest.raises(logic.FleetConfigError):
        logic.ec2_filter_list("tag:Role=a")
    assert logic.asg_request([], {}) == {"MaxRecords": 100}
    assert logic.asg_request(["web"], {"team": ["a", "b"]}) == {
        "MaxRecords": 100, "AutoScalingGroupNames": ["web"], "Filters": [{"Name": "tag:team", "Values": ["a", "b"]}]}
    assert logic.fallback_instance_filters(["web"], {"team": "a"})[1:] == [
        {"Name": "tag:aws:autoscaling:groupName", "Values": ["web"]}, {"Name": "tag:team", "Values": ["a"]}]
    assert logic.fallback_instance_filters([], {})[1] == {"Name": "tag-key", "Values": ["aws:autoscaling:groupName"]}


def test_the_filters_the_plugin_builds_are_valid_botocore_requests():
    model = botocore.session.get_session().get_service_model("ec2").operation_model("DescribeInstances")
    names = {"Filters", "InstanceIds", "MaxResults", "NextToken", "DryRun"}
    assert set(model.input_shape.members) >= names
    asg = botocore.session.get_session().get_service_model("autoscaling").operation_model("DescribeAutoScalingGroups")
    assert set(logic.asg_request(["a"], {"b": "c"})) <= set(asg.input_shape.members)


# --- planning and errors ---------------------------------------------------------------------------

def test_a_refused_template_batch_falls_back_to_the_documented_page_size_once():
    assert logic.smaller_template_batch(1000, "InvalidParameterValue") == 200
    assert logic.smaller_template_batch(300, "InvalidRequest") == 200
    assert logic.smaller_template_batch(200, "InvalidParameterValue") is None
    assert logic.smaller_template_batch(1000, "UnauthorizedOperation") is None
    assert logic.smaller_template_batch(1000, "RequestLimitExceeded") is None


def test_missing_ids_and_error_classes():
    message = "The instance IDs 'i-0123456789abcdef0, i-00000000000000001' do not exist"
    assert logic.missing_instance_ids(message) == {"i-0123456789abcdef0", "i-00000000000000001"}
    assert logic.classify_error("UnauthorizedOperation") == "denied"
    assert logic.classify_error("AccessDenied", 403) == "denied"
    assert logic.classify_error("AuthFailure", 401) == "credentials"
    assert logic.classify_error("OptInRequired", 403) == "credentials"
    assert logic.classify_error("InternalError", 500) == "error"
    text = logic.error_message("denied", "us-east-1", "ec2:DescribeInstances", "UnauthorizedOperation", "no")
    assert "ec2:DescribeInstances" in text and "docs/iam/inventory.json" in text
    assert "skip_failed_regions" in logic.error_message("credentials", "ap-east-1", "x", "AuthFailure", "")
    assert "endpoint_url" in logic.error_message("unreachable", "us-east-1", "x", "", "refused")


# --- records and drift ---------------------------------------------------------------------------

def group(version="$Latest", instances=None):
    return logic.asg_summary({
        "AutoScalingGroupName": "web",
        "LaunchTemplate": {"LaunchTemplateId": "lt-1", "LaunchTemplateName": "web-lt", "Version": version},
        "Instances": instances or [
            {"InstanceId": "i-00000000000000001", "LifecycleState": "InService", "HealthStatus": "Healthy",
             "LaunchTemplate": {"LaunchTemplateId": "lt-1", "LaunchTemplateName": "web-lt", "Version": "3"}},
        ],
    })


INSTANCE = {
    "InstanceId": "i-00000000000000001", "State": {"Name": "running"},
    "Placement": {"AvailabilityZone": "us-east-1a"}, "SubnetId": "subnet-1", "VpcId": "vpc-1",
    "PrivateIpAddress": "10.0.0.5", "PrivateDnsName": "ip-10-0-0-5.ec2.internal", "PublicDnsName": "",
    "InstanceType": "m7g.large", "ImageId": "ami-1",
    "LaunchTime": datetime.datetime(2026, 11, 20, 8, 14, 3, tzinfo=datetime.timezone.utc),
    "IamInstanceProfile": {"Arn": "arn:aws:iam::1:instance-profile/web"},
    "Tags": [{"Key": "Name", "Value": "web"}, {"Key": "aws:autoscaling:groupName", "Value": "web"}],
}


def test_target_version_and_drift():
    versions = {"lt-1": {"latest": 4, "default": 3}}
    assert logic.target_version(group("$Latest")["launch_template"], versions) == 4
    assert logic.target_version(group("$Default")["launch_template"], versions) == 3
    assert logic.target_version(group("3")["launch_template"], {}) == 3
    assert logic.target_version(group("$Latest")["launch_template"], {}) is None
    g = group("$Latest")
    member = g["instances"]["i-00000000000000001"]
    assert logic.drift(g, member, 4) is True
    assert logic.drift(g, member, 3) is False
    assert logic.drift(g, member, None) is None
    other = dict(member, launch_template={"LaunchTemplateId": "lt-2", "Version": "4"})
    assert logic.drift(g, other, 4) is True  # another template altogether
    legacy = logic.asg_summary({"AutoScalingGroupName": "old", "LaunchConfigurationName": "lc-2", "Instances": [
        {"InstanceId": "i-1", "LifecycleState": "InService", "LaunchConfigurationName": "lc-1"}]})
    assert logic.drift(legacy, legacy["instances"]["i-1"], None) is True
    mixed = logic.asg_summary({"AutoScalingGroupName": "m", "MixedInstancesPolicy": {"LaunchTemplate": {
        "LaunchTemplateSpecification": {"LaunchTemplateId": "lt-9", "Version": "2"}}}, "Instances": []})
    assert mixed["launch_template"] == {"id": "lt-9", "name": None, "version": "2"}
    assert logic.templates_to_resolve([group("$Latest"), group("7"), mixed]) == ["lt-1"]


def test_instance_record_and_host_vars():
    g = group("$Latest")
    record = logic.instance_record(INSTANCE, "us-east-1", g, g["instances"]["i-00000000000000001"],
                                   {"lt-1": {"latest": 4, "default": 4}})
    assert record["asg_name"] == "web" and record["lifecycle_state"] == "InService"
    assert record["launch_template_version"] == 3 and record["launch_template_target_version"] == 4
    assert record["launch_template_drift"] is True
    assert record["launch_time"] == "2026-11-20T08:14:03+00:00"
    assert record["public_dns_name"] is None and record["public_ip_address"] is None
    assert record["instance_profile_arn"] == "arn:aws:iam::1:instance-profile/web"
    assert record["ec2_tags"] == {"Name": "web", "aws:autoscaling:groupName": "web"}
    public = dict(record, public_ip_address="198.51.100.7")
    variables = logic.host_vars(record, "-o ProxyJump=admin@192.0.2.1")
    assert variables is record, "the record is taken over, not copied"
    assert variables["ansible_host"] == "10.0.0.5"
    assert variables["ansible_ssh_common_args"] == "-o ProxyJump=admin@192.0.2.1"
    assert "ansible_ssh_common_args" not in logic.host_vars(public, "-o ProxyJump=x")
    assert logic.host_vars(public)["ansible_host"] == "198.51.100.7"
    standalone = logic.instance_record(dict(INSTANCE, Tags=[]), "us-east-1")
    assert standalone["standalone"] is True and "standalone" not in logic.host_vars(standalone)


def test_lifecycle_selection():
    assert logic.keep_record({"lifecycle_state": "InService", "instance_state": "running"}, frozenset({"InService"}))
    assert not logic.keep_record({"lifecycle_state": "Standby", "instance_state": "running"}, frozenset({"InService"}))
    assert logic.keep_record({"lifecycle_state": "Standby"}, None)
    assert not logic.keep_record({"lifecycle_state": "Terminating", "instance_state": "shutting-down"},
                                 frozenset({"Terminating"}))
    assert logic.keep_record({"lifecycle_state": None, "instance_state": "running"}, frozenset({"InService"}))
    assert not logic.keep_record({"lifecycle_state": None, "instance_state": "stopped"}, frozenset({"InService"}))
    assert logic.keep_record({"standalone": True, "instance_state": "stopped"}, frozenset({"InService"}))


# --- inventory shaping ---------------------------------------------------------------------------

@given(st.text(max_size=40))
def test_group_names_are_always_valid(name):
    cleaned = logic.safe_group_name(name)
    assert cleaned and (cleaned[0].isalpha() or cleaned[0] == "_")
    assert all(c.isascii() and (c.isalnum() or c == "_") for c in cleaned)


def test_builtin_groups():
    record = {"asg_name": "web-1", "availability_zone": "us-east-1a", "region": "us-east-1",
              "lifecycle_state": "Pending:Wait", "launch_template_drift": True}
    assert logic.builtin_groups(record) == ["asg_web_1", "az_us_east_1a", "region_us_east_1", "lifecycle_pending_wait",
                                            "launch_template_drift"]
    assert logic.builtin_groups({"standalone": True, "region": "eu-west-1"}, "fleet_") == ["standalone", "region_eu_west_1"]
    v1 = {"asg_name": "web", "region": "us-east-1", "metadata_options": {"imdsv1": True}}
    assert logic.builtin_groups(v1, region_groups=False) == ["asg_web", "imdsv1"]
    v2 = {"asg_name": "web", "region": "us-east-1", "metadata_options": {"imdsv1": False}}
    assert logic.builtin_groups(v2, region_groups=False) == ["asg_web"]


def test_metadata_options_host_var():
    assert logic.metadata_options(INSTANCE) is None  # EC2 did not say: unknown, not v1
    options = {"State": "applied", "HttpTokens": "optional", "HttpPutResponseHopLimit": 1,
               "HttpEndpoint": "enabled", "InstanceMetadataTags": "disabled", "HttpProtocolIpv6": "disabled"}
    assert logic.metadata_options(dict(INSTANCE, MetadataOptions=options)) == {
        "http_tokens": "optional", "http_put_response_hop_limit": 1, "http_endpoint": "enabled",
        "instance_metadata_tags": "disabled", "imdsv1": True}
    required = logic.metadata_options(dict(INSTANCE, MetadataOptions=dict(options, HttpTokens="required")))
    assert required["imdsv1"] is False
    off = logic.metadata_options(dict(INSTANCE, MetadataOptions=dict(options, HttpEndpoint="disabled")))
    assert off["imdsv1"] is False  # no metadata service at all: nothing to migrate


def test_hostname_preferences_and_fallbacks():
    record = {"instance_id": "i-1", "private_ip_address": "10.0.0.5", "public_dns_name": None,
              "ec2_tags": {"Name": "web"}}
    assert logic.choose_hostname(record, logic.DEFAULT_HOSTNAMES) == "10.0.0.5"
    assert logic.choose_hostname(record, ["tag:Name"]) == "web"
    assert logic.choose_hostname(record, ["tag:Name"], taken={"web"}) == "10.0.0.5"
    assert logic.choose_hostname(record, ["tag:Missing"], taken={"10.0.0.5"}) == "i-1"
    assert logic.choose_hostname({"instance_id": "i-2"}, ["dns-name"]) == "i-2"


def test_proxy_jump_args():
    assert logic.proxy_jump_args("192.0.2.1") == "-o ProxyJump=192.0.2.1"
    assert logic.proxy_jump_args("192.0.2.1", "admin", 22) == "-o ProxyJump=admin@192.0.2.1"
    assert logic.proxy_jump_args("b.example.com", "ops", 2222, "-o ServerAliveInterval=30") == \
        "-o ProxyJump=ops@b.example.com:2222 -o ServerAliveInterval=30"
    assert logic.bastion_address({"public_ip_address": None, "public_dns_name": "b", "private_ip_address": "10.0.0.1"}) == "b"


def test_cache_key_changes_with_path_options_and_identity():
    base = logic.cache_key("fleetkeeper.aws.fleet", "/a.fleet.yml", {"regions": ["us-east-1"]}, {"access_key": "A"})
    assert base.startswith("fleetkeeper_aws_fleet_")
    assert base == logic.cache_key("fleetkeeper.aws.fleet", "/a.fleet.yml", {"regions": ["us-east-1"]}, {"access_key": "A"})
    assert base != logic.cache_key("fleetkeeper.aws.fleet", "/b.fleet.yml", {"regions": ["us-east-1"]}, {"access_key": "A"})
    assert base != logic.cache_key("fleetkeeper.aws.fleet", "/a.fleet.yml", {"regions": ["eu-west-1"]}, {"access_key": "A"})
    assert base != logic.cache_key("fleetkeeper.aws.fleet", "/a.fleet.yml", {"regions": ["us-east-1"]}, {"access_key": "B"})


# --- variables shared by an ASG group ------------------------------------------------------------

def entry(name, asg, **extra):
    variables = {"ansible_host": name, "instance_id": "i-" + name, "asg_name": asg, "instance_type": "t3.micro",
                 "ec2_tags": {"team": "web"}, "launch_template_version": 2}
    variables.update(extra)
    return [name, ["asg_" + asg if asg else "standalone"], variables]


def test_values_every_host_of_an_asg_shares_move_to_its_group():
    entries = [entry("a", "web"), entry("b", "web", instance_type="t3.small"), entry("c", "db"), entry("d", "db")]
    shared = logic.hoist_group_vars(entries)
    assert shared == {
        "asg_web": {"asg_name": "web", "ec2_tags": {"team": "web"}, "launch_template_version": 2},
        "asg_db": {"asg_name": "db", "instance_type": "t3.micro", "ec2_tags": {"team": "web"},
                   "launch_template_version": 2}}
    assert entries[0][2] == {"ansible_host": "a", "instance_id": "i-a", "instance_type": "t3.micro"}
    assert entries[2][2] == {"ansible_host": "c", "instance_id": "i-c"}


def test_only_equal_values_of_equal_type_in_groups_of_two_or_more_this_source_made_are_moved():
    entries = [entry("a", "web", launch_template_version=1, ec2_tags={"n": 1}),
               entry("b", "web", launch_template_version=True, ec2_tags={"n": True}),
               entry("c", "lonely"), entry("d", None), entry("e", None),
               entry("f", "theirs"), entry("g", "theirs"),
               entry("h", "my-app", ansible_host="same", instance_id="same"),
               entry("i", "my-app", ansible_host="same", instance_id="same")]
    shared = logic.hoist_group_vars(entries, skip_groups={"asg_theirs"})
    assert shared == {"asg_web": {"asg_name": "web", "instance_type": "t3.micro"},
                      "asg_my_app": {"asg_name": "my-app", "instance_type": "t3.micro", "ec2_tags": {"team": "web"},
                                     "launch_template_version": 2}}
    assert entries[0][2]["launch_template_version"] == 1 and entries[1][2]["launch_template_version"] is True
    for lone in entries[2:7]:
        assert "asg_name" in lone[2] or lone[2]["asg_name"] is None
    assert entries[7][2]["ansible_host"] == "same" and entries[7][2]["instance_id"] == "same"
    assert logic.hoist_group_vars([entry("x", "web"), entry("y", "web")], asg_prefix="g_") == {
        "g_web": {"asg_name": "web", "instance_type": "t3.micro", "ec2_tags": {"team": "web"},
                  "launch_template_version": 2}}

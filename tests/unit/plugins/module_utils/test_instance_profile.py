# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planning logic of asg_instance_profile (plugins/module_utils/instance_profile_plan.py), no network."""

from __future__ import annotations

import pytest

from ansible_collections.fleetkeeper.aws.plugins.module_utils import instance_profile_plan as ip

ARN = "arn:aws:iam::123456789012:instance-profile/web"
OTHER = "arn:aws:iam::123456789012:instance-profile/other"
DESIRED = ip.ProfileRef("web", ARN)


def template(latest=3, default=1, profiles=None):
    """A TemplateState whose versions 1..latest carry profiles[n] (an IamInstanceProfile dict or None)."""
    profiles = profiles or {}
    versions = {}
    for number in range(1, latest + 1):
        data = {"ImageId": "ami-1", "InstanceType": "t3.small", "UserData": f"v{number}"}
        if profiles.get(number):
            data["IamInstanceProfile"] = profiles[number]
        versions[number] = data
    return ip.TemplateState("lt-1", "web-lt", latest, default, versions)


def ref(version, source="LaunchTemplate"):
    return {"source": source, "id": "lt-1", "name": "web-lt", "version": version}


# --- profile identity --------------------------------------------------------

def test_profile_name_from_arn_keeps_only_the_last_path_segment():
    assert ip.profile_name_from_arn("arn:aws:iam::1:instance-profile/a/b/web") == "web"
    assert ip.profile_name_from_arn(ARN) == "web"
    assert ip.profile_name_from_arn(None) is None


@pytest.mark.parametrize("spec,expected", [
    ({"Arn": ARN}, True),
    ({"Name": "web"}, True),               # the template names it: same profile, names are unique
    ({"Name": "other"}, False),
    ({"Arn": OTHER}, False),
    ({"Arn": "arn:aws:iam::123456789012:instance-profile/p/web"}, False),  # another path: another ARN
    (ARN, True),
    (None, False),
    ({}, False),
])
def test_profiles_are_compared_by_arn(spec, expected):
    assert DESIRED.matches(spec) is expected


def test_without_an_arn_yet_names_are_compared():
    pending = ip.ProfileRef("web", None)
    assert pending.matches(ARN)
    assert not pending.matches(OTHER)
    assert pending.as_template_data() == {"Name": "web"}


def test_iam_not_ready_is_recognised_by_code_and_message():
    class Err(Exception):
        def __init__(self, code, message):
            super().__init__(message)
            self.response = {"Error": {"Code": code, "Message": message}}

    assert ip.is_iam_not_ready(Err("InvalidParameterValue", "Value (web) for parameter iamInstanceProfile.name "
                                                            "is invalid. Invalid IAM Instance Profile name"))
    assert ip.is_iam_not_ready(Err("NoSuchEntity", "Instance profile web not found"))
    assert not ip.is_iam_not_ready(Err("InvalidParameterValue", "bad instance id"))
    assert not ip.is_iam_not_ready(Err("IncorrectState", "Invalid IAM Instance Profile"))


# --- launch templates --------------------------------------------------------

def test_follows():
    assert ip.follows("$Latest") == "$Latest"
    assert ip.follows("$Default") == "$Default"
    assert ip.follows(None) == "$Default"
    assert ip.follows("7") == "pinned"


def test_latest_without_profile_gets_a_patch_of_only_iam_instance_profile():
    plan = ip.plan_template(ref("$Latest"), template(), DESIRED, "present", ip.VERSION_KEEP)
    create = plan["create_version"]
    assert create["request"] == {"SourceVersion": "3", "LaunchTemplateData": {"IamInstanceProfile": {"Arn": ARN}}}
    assert create["full_data"]["UserData"] == "v3" and create["full_data"]["IamInstanceProfile"] == {"Arn": ARN}
    assert plan["version_before"] == 3 and plan["version_after"] == 4
    assert plan["spec_after"] == "$Latest" and not plan["update_group"] and not plan["set_default"]
    assert plan["follows"] == "$Latest" and plan["changed"]


def test_template_naming_the_profile_by_name_needs_no_new_version():
    plan = ip.plan_template(ref("$Latest"), template(profiles={3: {"Name": "web"}}), DESIRED, "present",
                            ip.VERSION_KEEP)
    assert plan["create_version"] is None and not plan["changed"]
    assert plan["profile_before"] == "web"


def test_template_with_another_profile_gets_a_new_version():
    plan = ip.plan_template(ref("$Latest"), template(profiles={3: {"Arn": OTHER}}), DESIRED, "present",
                            ip.VERSION_KEEP)
    assert plan["create_version"]["source_version"] == 3
    assert plan["profile_before"] == OTHER and plan["profile_after"] == ARN


def test_default_follower_moves_the_default_version():
    plan = ip.plan_template(ref(None), template(latest=3, default=2), DESIRED, "present", ip.VERSION_KEEP)
    assert plan["create_version"]["source_version"] == 2  # the version the group runs, not $Latest
    assert plan["set_default"] and not plan["update_group"]
    assert plan["follows"] == "$Default" and plan["spec_after"] is None


def test_pinned_group_is_repinned_to_the_new_version():
    plan = ip.plan_template(ref("2"), template(latest=3, default=1), DESIRED, "present", ip.VERSION_KEEP)
    assert plan["create_version"]["source_version"] == 2
    assert plan["spec_after"] == "4" and plan["update_group"] and not plan["set_default"]


def test_pinned_group_on_a_version_with_the_profile_is_left_alone():
    plan = ip.plan_template(ref("2"), template(profiles={2: {"Arn": ARN}}), DESIRED, "present", ip.VERSION_KEEP)
    assert not plan["changed"]


def test_mode_latest_moves_a_pinned_group_to_latest_when_latest_has_the_profile():
    plan = ip.plan_template(ref("2"), template(profiles={3: {"Arn": ARN}}), DESIRED, "present", ip.VERSION_LATEST)
    assert plan["create_version"] is None
    assert plan["spec_after"] == "$Latest" and plan["update_group"] and plan["version_after"] == 3


def test_mode_pinned_pins_a_latest_group_without_a_new_version_when_not_needed():
    plan = ip.plan_template(ref("$Latest"), template(profiles={3: {"Arn": ARN}}), DESIRED, "present",
                            ip.VERSION_PINNED)
    assert plan["create_version"] is None and plan["spec_after"] == "3" and plan["update_group"]


def test_mode_default_points_a_latest_group_at_default():
    plan = ip.plan_template(ref("$Latest"), template(latest=3, default=1), DESIRED, "present", ip.VERSION_DEFAULT)
    assert plan["create_version"]["source_version"] == 1
    assert plan["set_default"] and plan["spec_after"] == "$Default" and plan["update_group"]


def test_absent_removes_the_profile_with_a_full_copy():
    plan = ip.plan_template(ref("$Latest"), template(profiles={3: {"Arn": ARN}}), DESIRED, "absent",
                            ip.VERSION_KEEP)
    request = plan["create_version"]["request"]
    assert "SourceVersion" not in request
    assert "IamInstanceProfile" not in request["LaunchTemplateData"]
    assert request["LaunchTemplateData"]["UserData"] == "v3"


def test_absent_leaves_another_profile_alone():
    plan = ip.plan_template(ref("$Latest"), template(profiles={3: {"Arn": OTHER}}), DESIRED, "absent",
                            ip.VERSION_KEEP)
    assert not plan["changed"]


def test_template_state_records_versions_for_the_next_group():
    state = template()
    plan = ip.plan_template(ref("$Latest"), state, DESIRED, "present", ip.VERSION_KEEP)
    state.record_version(4, plan["create_version"]["full_data"])
    again = ip.plan_template(ref("$Latest"), state, DESIRED, "present", ip.VERSION_KEEP)
    assert again["create_version"] is None and again["version_before"] == 4


def test_template_state_from_versions():
    records = [
        {"LaunchTemplateId": "lt-1", "LaunchTemplateName": "n", "VersionNumber": 5, "DefaultVersion": False,
         "LaunchTemplateData": {"ImageId": "a"}},
        {"LaunchTemplateId": "lt-1", "LaunchTemplateName": "n", "VersionNumber": 2, "DefaultVersion": True,
         "LaunchTemplateData": {}},
    ]
    state = ip.TemplateState.from_versions(records)
    assert (state.latest, state.default, state.resolve("$Latest"), state.resolve(None), state.resolve("2")) == \
        (5, 2, 5, 2, 2)


def test_launch_configuration_is_unsupported_with_a_clear_message():
    with pytest.raises(ip.GroupError, match="launch configuration 'old-lc'.*unsupported.*launch template"):
        ip.template_references({"AutoScalingGroupName": "g", "LaunchConfigurationName": "old-lc"})


def test_mixed_instances_policy_references_include_overrides():
    group = {
        "AutoScalingGroupName": "g",
        "MixedInstancesPolicy": {"LaunchTemplate": {
            "LaunchTemplateSpecification": {"LaunchTemplateId": "lt-1", "Version": "$Latest"},
            "Overrides": [{"InstanceType": "t3.small"},
                          {"InstanceType": "m6g.large",
                           "LaunchTemplateSpecification": {"LaunchTemplateId": "lt-arm", "Version": "4"}}],
        }},
    }
    refs = ip.template_references(group)
    assert [(r["source"], r["id"], r["version"]) for r in refs] == [
        ("MixedInstancesPolicy", "lt-1", "$Latest"),
        ("MixedInstancesPolicy.Overrides[1]", "lt-arm", "4"),
    ]
    plans = [
        {"source": "MixedInstancesPolicy", "spec_after": "$Latest", "update_group": False},
        {"source": "MixedInstancesPolicy.Overrides[1]", "spec_after": "5", "update_group": True},
    ]
    request = ip.group_update_request(group, plans)
    template_part = request["MixedInstancesPolicy"]["LaunchTemplate"]
    assert template_part["LaunchTemplateSpecification"] == {"LaunchTemplateId": "lt-1", "Version": "$Latest"}
    assert template_part["Overrides"][0] == {"InstanceType": "t3.small"}
    override = template_part["Overrides"][1]["LaunchTemplateSpecification"]
    assert override == {"LaunchTemplateId": "lt-arm", "Version": "5"}
    assert "LaunchTemplate" not in request


def test_no_group_update_when_no_spec_changes():
    group = {"AutoScalingGroupName": "g", "LaunchTemplate": {"LaunchTemplateId": "lt-1", "Version": "$Latest"}}
    assert ip.group_update_request(group, [{"source": "LaunchTemplate", "spec_after": "$Latest",
                                            "update_group": False}]) is None


def test_groups_sharing_a_template_are_rolled_in_sequence():
    a, b, c, d = ({"AutoScalingGroupName": n} for n in "abcd")
    buckets = ip.bucket_by_template([(a, {"lt-1"}), (b, {"lt-2"}), (c, {"lt-1", "lt-3"}), (d, {"lt-3"})])
    names = sorted(sorted(g["AutoScalingGroupName"] for g in bucket) for bucket in buckets)
    assert names == [["a", "c", "d"], ["b"]]


# --- instances -----------------------------------------------------------------

def assoc(arn, state="associated", assoc_id="iip-assoc-1"):
    return {"AssociationId": assoc_id, "InstanceId": "i-1", "IamInstanceProfile": {"Arn": arn}, "State": state}


@pytest.mark.parametrize("associations,state,replace,action", [
    ([], "present", False, "associate"),
    ([assoc(ARN)], "present", False, "none"),
    ([assoc(ARN, "associating")], "present", False, "none"),
    ([assoc(OTHER)], "present", False, "mismatch"),
    ([assoc(OTHER)], "present", True, "replace"),
    ([assoc(OTHER, "disassociated")], "present", False, "associate"),
    ([assoc(OTHER, "disassociating")], "present", False, "associate"),
    ([assoc(ARN)], "absent", False, "disassociate"),
    ([assoc(OTHER)], "absent", False, "mismatch"),
    ([], "absent", False, "none"),
    ([assoc(OTHER, "disassociated", "a"), assoc(ARN, "associated", "b")], "present", False, "none"),
])
def test_plan_instance(associations, state, replace, action):
    plan = ip.plan_instance("i-1", associations, DESIRED, state, replace)
    assert plan["action"] == action


def test_disassociating_association_is_waited_for_before_associating():
    plan = ip.plan_instance("i-1", [assoc(OTHER, "disassociating")], DESIRED, "present", False)
    assert plan["wait_for_disassociation"] and plan["profile_before"] is None and plan["profile_after"] == ARN


def test_in_service_splits_out_other_lifecycle_states():
    group = {"Instances": [{"InstanceId": "i-1", "LifecycleState": "InService"},
                           {"InstanceId": "i-2", "LifecycleState": "Pending"},
                           {"InstanceId": "i-3", "LifecycleState": "Standby"}]}
    ready, skipped = ip.in_service(group)
    assert ready == ["i-1"]
    assert skipped == [{"instance_id": "i-2", "lifecycle_state": "Pending"},
                       {"instance_id": "i-3", "lifecycle_state": "Standby"}]


def test_diff_lists_only_what_changes():
    groups = [{
        "name": "web",
        "launch_templates": [{"source": "LaunchTemplate", "launch_template_name": "web-lt",
                              "launch_template_id": "lt-1", "changed": True, "spec_before": "$Latest",
                              "spec_after": "$Latest", "version_before": 3, "version_after": 4,
                              "profile_before": None, "profile_after": ARN}],
        "instances": [{"instance_id": "i-1", "action": "associate", "profile_before": None, "profile_after": ARN},
                      {"instance_id": "i-2", "action": "none", "profile_before": ARN, "profile_after": ARN},
                      {"instance_id": "i-3", "action": "mismatch", "profile_before": OTHER,
                       "profile_after": OTHER}],
    }, {"name": "quiet", "launch_templates": [], "instances": []}]
    diff = ip.build_diff(groups)
    assert diff["before"] == {"web": {"LaunchTemplate web-lt": {"version": "$Latest", "uses_version": 3,
                                                                "instance_profile": None},
                                      "instances": {"i-1": None}}}
    assert diff["after"]["web"]["instances"] == {"i-1": ARN}
    assert diff["after"]["web"]["LaunchTemplate web-lt"]["uses_version"] == 4


def test_summary_counts():
    groups = [{"changed": True, "status": "changed", "skipped_instances": [{}],
               "launch_templates": [{"created_version": 4}],
               "instances": [{"action": "associate"}, {"action": "none"}, {"action": "replace", "error": "x"}]}]
    summary = ip.summarise(groups)
    assert summary["associated"] == 1 and summary["unchanged"] == 1 and summary["failed"] == 1
    assert summary["skipped"] == 1 and summary["launch_template_versions_created"] == 1
    assert summary["groups_changed"] == 1


def test_the_module_parameters_and_their_defaults_come_from_the_options_themselves():
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator  # pylint: disable=import-outside-toplevel

    from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_roll import Options  # pylint: disable=import-outside-toplevel
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.metadata_options_roll import (  # pylint: disable=import-outside-toplevel
        MetadataRollOptions)

    spec = Options.argument_spec()
    params = ArgumentSpecValidator(spec).validate({}).validated_parameters
    assert Options.from_params(params) == Options()
    assert "default" not in spec["instance_refresh_preferences"]
    changed = ArgumentSpecValidator(spec).validate({"launch_template_version": "latest", "wait_timeout": 5})
    assert Options.from_params(changed.validated_parameters, check_mode=True) == Options(
        version_mode="latest", wait_timeout=5, check_mode=True)
    metadata = ArgumentSpecValidator(MetadataRollOptions.argument_spec()).validate({}).validated_parameters
    metadata["metadata_options"] = {"http_tokens": "required"}
    options = MetadataRollOptions.from_params(metadata)
    assert (options.window_days, options.force, options.max_concurrency) == (14, False, 10)
    assert options.desired

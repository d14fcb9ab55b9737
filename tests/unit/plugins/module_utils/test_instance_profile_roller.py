# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Roller (instance_profile_roll.py) against in-process fake clients that raise botocore's errors.

These cover what moto cannot produce: EC2 refusing a replace with
IncorrectState, 'Invalid IAM Instance Profile' right after creation,
associations stuck in 'disassociating', instance refreshes. Everything that
moto can answer is covered again end to end in tests/integration.
"""

from __future__ import annotations

import itertools

import botocore.exceptions
import pytest

from ansible_collections.fleetkeeper.aws.plugins.module_utils import instance_profile_plan as ip
from ansible_collections.fleetkeeper.aws.plugins.module_utils import instance_profile_roll as roll
from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_gateway import AutoScalingGateway

ACCOUNT = "123456789012"


def arn(name):
    return f"arn:aws:iam::{ACCOUNT}:instance-profile/{name}"


def api_error(code, message="", operation="Op"):
    """The ClientError botocore raises for an AWS error answer."""
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": message}}, operation)


class FakeIAM:
    def __init__(self, profiles):
        self.profiles = set(profiles)

    def get_instance_profile(self, InstanceProfileName, **_):
        if InstanceProfileName not in self.profiles:
            raise api_error("NoSuchEntity", f"Instance Profile {InstanceProfileName} cannot be found.")
        return {"InstanceProfile": {"InstanceProfileName": InstanceProfileName, "Arn": arn(InstanceProfileName)}}

    def get_waiter(self, name):
        assert name == "instance_profile_exists"
        iam = self

        class Waiter:
            def wait(self, InstanceProfileName, WaiterConfig):
                if InstanceProfileName not in iam.profiles:
                    raise botocore.exceptions.WaiterError(name="InstanceProfileExists", reason="Max attempts exceeded",
                                                          last_response={})
        return Waiter()


class FakeAutoScaling:
    def __init__(self, groups):
        self.groups = {g["AutoScalingGroupName"]: g for g in groups}
        self.updates = []
        self.refreshes = []
        self.refresh_error = None

    def describe_auto_scaling_groups(self, AutoScalingGroupNames=None, Filters=None, MaxRecords=None, **_):
        groups = [g for n, g in sorted(self.groups.items()) if not AutoScalingGroupNames or n in AutoScalingGroupNames]
        for f in Filters or []:
            key = f["Name"][4:]
            groups = [g for g in groups if any(t["Key"] == key and t["Value"] in f["Values"]
                                               for t in g.get("Tags", []))]
        return {"AutoScalingGroups": groups}

    def update_auto_scaling_group(self, **kwargs):
        kwargs.pop("aws_retry", None)
        self.updates.append(kwargs)

    def start_instance_refresh(self, AutoScalingGroupName, **kwargs):
        if self.refresh_error:
            raise self.refresh_error
        self.refreshes.append((AutoScalingGroupName, kwargs.get("Preferences")))
        return {"InstanceRefreshId": f"refresh-{AutoScalingGroupName}"}


class FakeEC2:
    def __init__(self, templates, associations=None):
        self.templates = templates  # id -> {"name", "default", "versions": {n: data}}
        self.associations = {a["InstanceId"]: dict(a) for a in associations or []}
        self.ids = itertools.count(100)
        self.calls = []
        self.faults = {}  # operation -> list of exceptions raised in order
        self.on_call = {}  # operation -> callable(kwargs) run before the call

    def _fault(self, operation, kwargs):
        self.calls.append((operation, kwargs))
        if operation in self.on_call:
            self.on_call[operation](kwargs)
        queue = self.faults.get(operation)
        if queue:
            raise queue.pop(0)

    def describe_launch_template_versions(self, Versions, LaunchTemplateId=None, **kwargs):
        self._fault("DescribeLaunchTemplateVersions", {"LaunchTemplateId": LaunchTemplateId})
        template = self.templates.get(LaunchTemplateId)
        if template is None:
            raise api_error("InvalidLaunchTemplateId.NotFound", f"The specified launch template, with template ID "
                                                                f"{LaunchTemplateId}, does not exist.")
        numbers = set()
        for spec in Versions:
            numbers.add(max(template["versions"]) if spec == "$Latest" else
                        template["default"] if spec == "$Default" else int(spec))
        return {"LaunchTemplateVersions": [
            {"LaunchTemplateId": LaunchTemplateId, "LaunchTemplateName": template["name"], "VersionNumber": n,
             "DefaultVersion": n == template["default"], "LaunchTemplateData": template["versions"][n]}
            for n in sorted(numbers, reverse=True)]}

    def create_launch_template_version(self, LaunchTemplateId, LaunchTemplateData, SourceVersion=None, **kwargs):
        self._fault("CreateLaunchTemplateVersion", {"LaunchTemplateId": LaunchTemplateId,
                                                    "SourceVersion": SourceVersion, "Data": LaunchTemplateData})
        template = self.templates[LaunchTemplateId]
        data = dict(template["versions"][int(SourceVersion)]) if SourceVersion else {}
        data.update(LaunchTemplateData)
        number = max(template["versions"]) + 1
        template["versions"][number] = data
        return {"LaunchTemplateVersion": {"VersionNumber": number}}

    def modify_launch_template(self, LaunchTemplateId, DefaultVersion, **kwargs):
        self._fault("ModifyLaunchTemplate", {"LaunchTemplateId": LaunchTemplateId})
        self.templates[LaunchTemplateId]["default"] = int(DefaultVersion)

    def describe_iam_instance_profile_associations(self, Filters, **kwargs):
        self._fault("DescribeIamInstanceProfileAssociations", {})
        ids = Filters[0]["Values"]
        return {"IamInstanceProfileAssociations": [dict(a) for i, a in self.associations.items() if i in ids]}

    def associate_iam_instance_profile(self, InstanceId, IamInstanceProfile, **kwargs):
        self._fault("AssociateIamInstanceProfile", {"InstanceId": InstanceId})
        if InstanceId in self.associations:
            raise api_error("IncorrectState", f"There is an existing association for instance {InstanceId}")
        record = {"AssociationId": f"iip-assoc-{next(self.ids)}", "InstanceId": InstanceId,
                  "IamInstanceProfile": {"Arn": IamInstanceProfile["Arn"]}, "State": "associated"}
        self.associations[InstanceId] = record
        return {"IamInstanceProfileAssociation": dict(record, State="associating")}

    def replace_iam_instance_profile_association(self, AssociationId, IamInstanceProfile, **kwargs):
        self._fault("ReplaceIamInstanceProfileAssociation", {"AssociationId": AssociationId})
        for record in self.associations.values():
            if record["AssociationId"] == AssociationId:
                record["IamInstanceProfile"] = {"Arn": IamInstanceProfile["Arn"]}
                return {"IamInstanceProfileAssociation": dict(record)}
        raise api_error("InvalidAssociationID.NotFound", AssociationId)

    def disassociate_iam_instance_profile(self, AssociationId, **kwargs):
        self._fault("DisassociateIamInstanceProfile", {"AssociationId": AssociationId})
        for instance_id, record in list(self.associations.items()):
            if record["AssociationId"] == AssociationId:
                del self.associations[instance_id]
                return {"IamInstanceProfileAssociation": dict(record, State="disassociating")}
        raise api_error("InvalidAssociationID.NotFound", AssociationId)

    def ops(self, operation):
        return [kwargs for op, kwargs in self.calls if op == operation]


def group(name, instances, template_id="lt-1", version="$Latest", tags=None, **extra):
    record = {
        "AutoScalingGroupName": name,
        "Instances": [{"InstanceId": i, "LifecycleState": "InService"} for i in instances],
        "Tags": [{"Key": k, "Value": v} for k, v in (tags or {}).items()],
    }
    if template_id:
        record["LaunchTemplate"] = {"LaunchTemplateId": template_id, "LaunchTemplateName": f"{template_id}-name",
                                    "Version": version}
    record.update(extra)
    return record


def assoc(instance_id, profile, state="associated"):
    return {"AssociationId": f"iip-assoc-{instance_id}", "InstanceId": instance_id,
            "IamInstanceProfile": {"Arn": arn(profile)}, "State": state}


class Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def make(groups, templates=None, associations=None, profiles=("web", "other"), **options):
    templates = templates or {"lt-1": {"name": "lt-1-name", "default": 1,
                                       "versions": {1: {"ImageId": "ami-1"}}}}
    ec2 = FakeEC2(templates, associations)
    autoscaling = FakeAutoScaling(groups)
    iam = FakeIAM(profiles)
    clock = Clock()
    gateway = AutoScalingGateway(ec2, autoscaling, iam=iam)
    roller = roll.Roller(gateway, roll.Options(**options), sleep=clock.sleep, clock=clock)
    return roller, ec2, autoscaling, clock


def test_first_run_creates_one_version_for_groups_sharing_a_template():
    roller, ec2, autoscaling, _clock = make([group("a", ["i-1", "i-2"]), group("b", ["i-3"])])
    result = roller.run("web", names=["a", "b"])
    assert len(ec2.ops("CreateLaunchTemplateVersion")) == 1
    assert ec2.ops("CreateLaunchTemplateVersion")[0]["SourceVersion"] == "1"
    assert ec2.ops("CreateLaunchTemplateVersion")[0]["Data"] == {"IamInstanceProfile": {"Arn": arn("web")}}
    assert result["summary"]["associated"] == 3 and result["changed"]
    assert autoscaling.updates == []  # both follow $Latest
    again = roller.run("web", names=["a", "b"])
    assert not again["changed"] and again["summary"]["unchanged"] == 3


def test_check_mode_writes_nothing_and_predicts_the_version():
    roller, ec2, autoscaling, _clock = make([group("a", ["i-1"], version="1")], check_mode=True)
    result = roller.run("web", names=["a"])
    writes = [op for op, _kwargs in ec2.calls if not op.startswith("Describe")]
    assert writes == [] and autoscaling.updates == []
    template = result["groups"][0]["launch_templates"][0]
    assert template["created_version"] == 2 and template["spec_after"] == "2" and template["update_group"]
    assert result["diff"]["after"]["a"]["instances"] == {"i-1": arn("web")}


def test_pinned_group_is_repinned_with_the_real_version_number():
    templates = {"lt-1": {"name": "n", "default": 1, "versions": {1: {}, 2: {}, 3: {}}}}
    roller, ec2, autoscaling, _clock = make([group("a", [], version="2")], templates=templates)
    roller.run("web", names=["a"])
    assert autoscaling.updates == [{"AutoScalingGroupName": "a",
                                    "LaunchTemplate": {"LaunchTemplateId": "lt-1", "Version": "4"}}]
    assert templates["lt-1"]["versions"][4]["IamInstanceProfile"] == {"Arn": arn("web")}


def test_replace_refused_with_incorrect_state_falls_back_to_disassociate_and_associate():
    roller, ec2, _asg, _clock = make([group("a", ["i-1"])], associations=[assoc("i-1", "other")], replace=True)
    ec2.faults["ReplaceIamInstanceProfileAssociation"] = [api_error("IncorrectState", "association is associating")]
    result = roller.run("web", names=["a"])
    instance = result["groups"][0]["instances"][0]
    assert instance["action"] == "replace" and instance["fallback"] == "disassociate+associate"
    assert ec2.associations["i-1"]["IamInstanceProfile"]["Arn"] == arn("web")
    assert len(ec2.ops("DisassociateIamInstanceProfile")) == 1 and not result["failed_groups"]


def test_mismatch_is_reported_not_replaced():
    roller, ec2, _asg, _clock = make([group("a", ["i-1", "i-2"])], associations=[assoc("i-1", "other")])
    result = roller.run("web", names=["a"])
    assert result["mismatched"] == ["i-1"]
    assert ec2.associations["i-1"]["IamInstanceProfile"]["Arn"] == arn("other")
    assert ec2.ops("ReplaceIamInstanceProfileAssociation") == []
    assert any("replace: true" in w for w in roller.warnings)


def test_invalid_iam_instance_profile_is_retried_with_backoff():
    roller, ec2, _asg, clock = make([group("a", ["i-1"])], wait_timeout=60)
    not_ready = api_error("InvalidParameterValue", "Value (web) for parameter iamInstanceProfile.name is invalid. "
                                                   "Invalid IAM Instance Profile name")
    ec2.faults["AssociateIamInstanceProfile"] = [not_ready, not_ready, not_ready]
    result = roller.run("web", names=["a"])
    assert result["summary"]["associated"] == 1
    assert len(ec2.ops("AssociateIamInstanceProfile")) == 4
    assert len(clock.sleeps) == 3 and clock.sleeps[2] > clock.sleeps[0] * 0.9


def test_invalid_iam_instance_profile_gives_up_after_wait_timeout():
    roller, ec2, _asg, clock = make([group("a", ["i-1"]), group("b", [], template_id="lt-1")], wait_timeout=10)
    not_ready = api_error("InvalidParameterValue", "Invalid IAM Instance Profile name")
    ec2.faults["AssociateIamInstanceProfile"] = [not_ready] * 50
    result = roller.run("web", names=["a", "b"])
    assert result["failed_groups"] == ["a"]
    assert "Invalid IAM Instance Profile" in result["groups"][0]["error"]
    assert clock.now <= 10


def test_disassociating_association_is_awaited_then_associated():
    record = assoc("i-1", "other", state="disassociating")
    roller, ec2, _asg, clock = make([group("a", ["i-1"])], associations=[record])

    def settle(_kwargs):
        if len(ec2.ops("DescribeIamInstanceProfileAssociations")) >= 3:
            ec2.associations.pop("i-1", None)
    ec2.on_call["DescribeIamInstanceProfileAssociations"] = settle
    result = roller.run("web", names=["a"])
    assert result["summary"]["associated"] == 1 and clock.sleeps
    assert ec2.associations["i-1"]["IamInstanceProfile"]["Arn"] == arn("web")


def test_association_made_meanwhile_is_recognised():
    roller, ec2, _asg, _clock = make([group("a", ["i-1"])])

    def race(kwargs):
        if len(ec2.ops("AssociateIamInstanceProfile")) == 1:
            ec2.associations["i-1"] = assoc("i-1", "web")
    ec2.on_call["AssociateIamInstanceProfile"] = race
    result = roller.run("web", names=["a"])
    assert not result["failed_groups"] and result["groups"][0]["instances"][0]["association_id"] == "iip-assoc-i-1"


def test_absent_disassociates_only_this_profile():
    roller, ec2, _asg, _clock = make(
        [group("a", ["i-1", "i-2", "i-3"])], associations=[assoc("i-1", "web"), assoc("i-2", "other")], state="absent"
    )
    result = roller.run("web", names=["a"])
    assert "i-1" not in ec2.associations and ec2.associations["i-2"]["IamInstanceProfile"]["Arn"] == arn("other")
    assert result["summary"]["disassociated"] == 1


def test_absent_with_unknown_profile_names_it():
    roller, *_rest = make([group("a", ["i-1"])], state="absent")
    with pytest.raises(ip.ProfileNotFoundError, match="'ghost' does not exist"):
        roller.run("ghost", names=["a"])


def test_present_with_unknown_profile_waits_then_names_it():
    roller, *_rest = make([group("a", ["i-1"])], wait_timeout=5)
    with pytest.raises(ip.ProfileNotFoundError, match="'ghost'"):
        roller.run("ghost", names=["a"])


def test_unknown_group_fails_before_any_call_that_writes():
    roller, ec2, _asg, _clock = make([group("a", ["i-1"])])
    with pytest.raises(ip.InputError, match="not found: nope"):
        roller.run("web", names=["a", "nope"])
    assert ec2.calls == []


def test_launch_configuration_and_missing_template_fail_before_any_change():
    groups = [group("a", ["i-1"]), group("lc", ["i-2"], template_id=None, LaunchConfigurationName="old"),
              group("gone", ["i-3"], template_id="lt-deleted")]
    roller, ec2, autoscaling, _clock = make(groups)
    with pytest.raises(ip.PlanningError) as info:
        roller.run("web", names=["a", "lc", "gone"])
    message = str(info.value)
    assert "nothing was changed" in message and "'lc'" in message and "launch configuration 'old'" in message
    assert "'gone'" in message and "lt-deleted" in message
    assert {g["name"]: g["status"] for g in info.value.groups} == {"a": "ok", "gone": "failed", "lc": "failed"}
    assert [op for op, _kwargs in ec2.calls if not op.startswith("Describe")] == [] and autoscaling.updates == []


def test_failure_in_one_group_leaves_the_others_finished():
    templates = {"lt-1": {"name": "one", "default": 1, "versions": {1: {}}},
                 "lt-2": {"name": "two", "default": 1, "versions": {1: {}}}}
    roller, ec2, _asg, _clock = make(
        [group("a", ["i-1"], template_id="lt-1"), group("b", ["i-2"], template_id="lt-2")], templates=templates, max_concurrency=1
    )
    ec2.faults["CreateLaunchTemplateVersion"] = [api_error("UnauthorizedOperation", "not allowed")]
    result = roller.run("web", names=["a", "b"])
    statuses = {g["name"]: g["status"] for g in result["groups"]}
    assert statuses == {"a": "failed", "b": "changed"}
    assert "i-1" not in ec2.associations  # the failed group's instances were left as they were
    assert ec2.associations["i-2"]["IamInstanceProfile"]["Arn"] == arn("web")
    assert "UnauthorizedOperation" in result["groups"][0]["error"]


def test_instance_refresh_started_only_where_a_version_was_created():
    templates = {"lt-1": {"name": "one", "default": 1, "versions": {1: {}}},
                 "lt-2": {"name": "two", "default": 1, "versions": {1: {"IamInstanceProfile": {"Name": "web"}}}}}
    roller, _ec2, autoscaling, _clock = make(
        [group("a", [], template_id="lt-1"), group("b", [], template_id="lt-2")], templates=templates,
        instance_refresh=True, instance_refresh_preferences={"MinHealthyPercentage": 90},
    )
    result = roller.run("web", names=["a", "b"])
    assert autoscaling.refreshes == [("a", {"MinHealthyPercentage": 90})]
    assert result["groups"][0]["instance_refresh"] == {"id": "refresh-a"}


def test_instance_refresh_in_progress_is_a_warning():
    roller, _ec2, autoscaling, _clock = make([group("a", [])], instance_refresh=True)
    autoscaling.refresh_error = api_error("InstanceRefreshInProgress", "An Instance Refresh is already in progress")
    result = roller.run("web", names=["a"])
    assert not result["failed_groups"] and any("already in progress" in w for w in roller.warnings)


def test_default_follower_moves_the_default_once_for_two_groups():
    templates = {"lt-1": {"name": "one", "default": 1, "versions": {1: {}, 2: {"ImageId": "new"}}}}
    roller, ec2, autoscaling, _clock = make(
        [group("a", [], version="$Default"), group("b", [], version="$Default")], templates=templates
    )
    roller.run("web", names=["a", "b"])
    assert len(ec2.ops("CreateLaunchTemplateVersion")) == 1 and len(ec2.ops("ModifyLaunchTemplate")) == 1
    assert templates["lt-1"]["default"] == 3 and autoscaling.updates == []
    assert "ImageId" not in templates["lt-1"]["versions"][3]  # made from version 1 (the default), not $Latest


def test_tag_filters_select_groups():
    roller, *_rest = make([group("a", [], tags={"team": "x"}), group("b", [], tags={"team": "y"})])
    result = roller.run("web", tag_filters={"team": "x"})
    assert [g["name"] for g in result["groups"]] == ["a"]
    with pytest.raises(ip.InputError, match="no Auto Scaling group matches"):
        roller.run("web", tag_filters={"team": "z"})


def test_instances_only_when_launch_template_management_is_off():
    roller, ec2, _asg, _clock = make(
        [group("a", ["i-1"], template_id=None, LaunchConfigurationName="old")], manage_launch_template=False
    )
    result = roller.run("web", names=["a"])
    assert result["summary"]["associated"] == 1 and ec2.ops("DescribeLaunchTemplateVersions") == []


# --- the gateway on its own: error mapping ------------------------------------------------------

def test_gateway_maps_client_errors_to_aws_call_errors_with_their_code():
    ec2 = FakeEC2({}, [assoc("i-1", "web")])
    gateway = AutoScalingGateway(ec2, FakeAutoScaling([]), iam=FakeIAM(["web"]))
    ec2.faults["AssociateIamInstanceProfile"] = [api_error("UnauthorizedOperation", "no")]
    with pytest.raises(ip.AwsCallError) as caught:
        gateway.associate_profile("i-2", arn("web"))
    assert caught.value.code == "UnauthorizedOperation" and "AssociateIamInstanceProfile i-2" in str(caught.value)
    gateway.disassociate_profile("i-9", "iip-assoc-gone")  # already gone: no error
    assert gateway.instance_profile("nope") is None
    with pytest.raises(ip.GroupError, match="Point the group at an existing launch template"):
        gateway.template_versions({"id": "lt-missing", "name": None}, ["$Latest"])


def test_gateway_start_instance_refresh_in_progress_is_none():
    autoscaling = FakeAutoScaling([])
    gateway = AutoScalingGateway(FakeEC2({}), autoscaling)
    assert gateway.start_instance_refresh("web", {"MinHealthyPercentage": 90}) == "refresh-web"
    autoscaling.refresh_error = api_error("InstanceRefreshInProgress", "busy")
    assert gateway.start_instance_refresh("web") is None

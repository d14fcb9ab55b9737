# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""fleetkeeper.aws.asg_instance_profile against the moto server, through the fault proxy.

Each module run goes through a real ansible-playbook process (run_module).
What EC2 holds afterwards is read back with boto3 through the same endpoint.
"""

from __future__ import annotations

import json
import os

import pytest

from lab import fleet as fleet_support
from lab import instance_profile as support
from lab.ansiblerun import run_module

MODULE = "fleetkeeper.aws.asg_instance_profile"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def estate(aws):
    """Three groups (web: 3 on $Latest, worker: 2 pinned to version 1, batch: 2 on a mixed instances policy
    following $Default), a profile 'app' and a profile 'legacy' already on one web instance."""
    ec2, autoscaling, iam = aws.client("ec2"), aws.client("autoscaling"), aws.client("iam")
    fleet = fleet_support.create_network(ec2, "us-east-1")
    fleet_support.create_group(ec2, autoscaling, fleet, "web", 3, tags={"tier": "front"})
    fleet_support.create_group(ec2, autoscaling, fleet, "worker", 2, tags={"tier": "back"})
    support.pin_group(autoscaling, "worker", fleet.launch_templates["worker-lt"], "1")
    support.create_mixed_group(ec2, autoscaling, fleet, "batch", 2)
    app = support.create_profile(iam, "app")
    legacy = support.create_profile(iam, "legacy")
    ec2.associate_iam_instance_profile(InstanceId=fleet.groups["web"][0], IamInstanceProfile={"Arn": legacy})
    aws.proxy.reset()
    return {"fleet": fleet, "app": app, "legacy": legacy, "ec2": ec2, "autoscaling": autoscaling,
            "instances": [i for ids in fleet.groups.values() for i in ids]}


def args(aws, **extra):
    base = {"instance_profile": "app", "names": ["web", "worker", "batch"], "endpoint_url": aws.endpoint_url}
    base.update(extra)
    return base


@pytest.mark.compat
def test_check_mode_then_apply_then_idempotent(aws, estate):
    ec2, autoscaling, fleet = estate["ec2"], estate["autoscaling"], estate["fleet"]
    web0 = fleet.groups["web"][0]

    check = run_module(MODULE, args(aws), env=aws.env(), check=True, diff=True)
    assert not check.failed, check.result
    assert check.changed
    assert support.write_calls(aws.proxy) == []  # check mode writes nothing
    summary = check["summary"]
    assert (summary["associated"], summary["mismatched"], summary["launch_template_versions_created"]) == (6, 1, 3)
    assert check["mismatched"] == [web0]
    diff = check["diff"]
    assert set(diff["after"]) == {"web", "worker", "batch"}
    assert diff["after"]["worker"]["LaunchTemplate worker-lt"] == {
        "version": "2", "uses_version": 2, "instance_profile": estate["app"]}
    assert diff["before"]["worker"]["LaunchTemplate worker-lt"]["version"] == "1"
    assert web0 not in diff["after"]["web"]["instances"]  # a mismatch is reported, not planned
    assert support.profile_of_instances(ec2, estate["instances"])[web0] == estate["legacy"]

    applied = run_module(MODULE, args(aws), env=aws.env(), diff=True)
    assert not applied.failed, applied.result
    assert applied.changed and applied["summary"] == summary
    assert applied["diff"] == diff  # check mode told exactly what was done
    profiles = support.profile_of_instances(ec2, estate["instances"])
    assert profiles.pop(web0) == estate["legacy"]
    assert set(profiles.values()) == {estate["app"]}
    by_name = {g["name"]: g for g in applied["groups"]}
    assert by_name["web"]["launch_templates"][0]["follows"] == "$Latest"
    assert by_name["worker"]["launch_templates"][0]["follows"] == "pinned"
    assert by_name["batch"]["launch_templates"][0]["follows"] == "$Default"
    assert by_name["batch"]["launch_templates"][0]["source"] == "MixedInstancesPolicy"
    for name, spec in (("web", "$Latest"), ("worker", "2"), ("batch", "$Default")):
        _template, version, profile = support.group_template(ec2, autoscaling, name)
        assert (version, profile) == (spec, {"Arn": estate["app"]}), name
    # Only IamInstanceProfile is patched, on top of the version the group used.
    creates = aws.proxy.calls("ec2", "CreateLaunchTemplateVersion")
    assert len(creates) == 3

    aws.proxy.reset()
    again = run_module(MODULE, args(aws), env=aws.env(), diff=True)
    assert not again.failed and not again.changed, again.result
    assert again["diff"] == {"before": {}, "after": {}}
    assert support.write_calls(aws.proxy) == []

    replaced = run_module(MODULE, args(aws, replace=True), env=aws.env())
    assert replaced.changed and replaced["summary"]["replaced"] == 1
    assert support.profile_of_instances(ec2, [web0])[web0] == estate["app"]
    assert not run_module(MODULE, args(aws, replace=True), env=aws.env()).changed


def test_tag_filters_and_arn(aws, estate):
    result = run_module(MODULE, {"instance_profile": estate["app"], "tag_filters": {"tier": "back"},
                                 "endpoint_url": aws.endpoint_url}, env=aws.env())
    assert not result.failed, result.result
    assert [g["name"] for g in result["groups"]] == ["worker"]
    profiles = support.profile_of_instances(estate["ec2"], estate["fleet"].groups["worker"])
    assert set(profiles.values()) == {estate["app"]}


def test_state_absent_detaches_and_is_idempotent(aws, estate):
    assert run_module(MODULE, args(aws), env=aws.env()).changed
    check = run_module(MODULE, args(aws, state="absent"), env=aws.env(), check=True)
    assert check.changed and check["summary"]["disassociated"] == 6
    absent = run_module(MODULE, args(aws, state="absent"), env=aws.env())
    assert not absent.failed and absent.changed, absent.result
    profiles = support.profile_of_instances(estate["ec2"], estate["instances"])
    web0 = estate["fleet"].groups["web"][0]
    assert profiles.pop(web0) == estate["legacy"]  # another profile is not ours to remove
    assert set(profiles.values()) == {None}
    for name in ("web", "worker", "batch"):
        assert support.group_template(estate["ec2"], estate["autoscaling"], name)[2] is None
    assert not run_module(MODULE, args(aws, state="absent"), env=aws.env()).changed


@pytest.mark.compat
def test_bad_input_names_the_culprit_and_changes_nothing(aws, estate):
    ec2, autoscaling, fleet = estate["ec2"], estate["autoscaling"], estate["fleet"]
    unknown = run_module(MODULE, args(aws, names=["web", "nosuchgroup"]), env=aws.env())
    assert unknown.failed and "nosuchgroup" in unknown["msg"]

    missing_profile = run_module(MODULE, args(aws, instance_profile="ghost", state="absent"), env=aws.env())
    assert missing_profile.failed and "'ghost' does not exist" in missing_profile["msg"]

    support.create_launch_configuration_group(autoscaling, fleet, "oldstyle")
    ec2.delete_launch_template(LaunchTemplateId=fleet.launch_templates["worker-lt"])
    aws.proxy.reset()
    planning = run_module(MODULE, args(aws, names=["web", "worker", "oldstyle"]), env=aws.env())
    assert planning.failed
    assert "nothing was changed" in planning["msg"]
    assert "'oldstyle'" in planning["msg"] and "launch configuration" in planning["msg"]
    assert "unsupported" in planning["msg"]
    assert "'worker'" in planning["msg"] and fleet.launch_templates["worker-lt"] in planning["msg"]
    assert {g["name"]: g["status"] for g in planning["groups"]} == {"oldstyle": "failed", "web": "ok",
                                                                    "worker": "failed"}
    assert support.write_calls(aws.proxy) == []


def test_throttling_and_server_errors_are_retried(aws, estate):
    aws.proxy.inject("throttle", service="ec2", operation="AssociateIamInstanceProfile", times=7)
    aws.proxy.inject("error", service="ec2", operation="DescribeLaunchTemplateVersions", times=3)
    aws.proxy.inject("error", service="ec2", operation="CreateLaunchTemplateVersion", times=2, status=503)
    aws.proxy.inject("throttle", service="autoscaling", operation="DescribeAutoScalingGroups", times=2)
    aws.proxy.inject("throttle", service="ec2", operation="DescribeIamInstanceProfileAssociations", times=2)
    result = run_module(MODULE, args(aws), env=aws.env())
    assert not result.failed, result.result
    assert result["summary"]["associated"] == 6
    injected = [c for c in aws.proxy.calls() if c.injected]
    assert len(injected) == 16
    profiles = support.profile_of_instances(estate["ec2"], estate["instances"])
    assert list(profiles.values()).count(estate["app"]) == 6
    aws.proxy.reset()
    assert not run_module(MODULE, args(aws), env=aws.env()).changed


def test_failure_in_one_group_leaves_the_others_done(aws, estate):
    # The first CreateLaunchTemplateVersion is refused: that group fails, the others finish.
    aws.proxy.inject("deny", service="ec2", operation="CreateLaunchTemplateVersion", times=1)
    result = run_module(MODULE, args(aws, max_concurrency=1), env=aws.env())
    assert result.failed
    statuses = {g["name"]: g["status"] for g in result["groups"]}
    failed = [n for n, s in statuses.items() if s == "failed"]
    assert len(failed) == 1 and sorted(s for n, s in statuses.items() if n not in failed) == ["changed", "changed"]
    assert result["failed_groups"] == failed
    assert f"'{failed[0]}'" in result["msg"] and "UnauthorizedOperation" in result["msg"] and "Finished:" in result["msg"]
    profiles = support.profile_of_instances(estate["ec2"], estate["instances"])
    assert set(profiles[i] for i in estate["fleet"].groups[failed[0]]) <= {None, estate["legacy"]}
    # The next run finishes the job.
    again = run_module(MODULE, args(aws), env=aws.env())
    assert not again.failed and [g["name"] for g in again["groups"] if g["changed"]] == failed


def test_operations_are_allowed_by_the_documented_policy(aws, estate):
    """Every API operation the module makes (present, replace, absent) is in docs/iam/instance_profile.json."""
    run_module(MODULE, args(aws), env=aws.env())
    run_module(MODULE, args(aws, replace=True, launch_template_version="pinned"), env=aws.env())
    run_module(MODULE, args(aws, state="absent", launch_template_version="default"), env=aws.env())
    with open(os.path.join(REPO, "docs", "iam", "instance_profile.json"), encoding="utf-8") as handle:
        policy = json.load(handle)
    seen = support.iam_actions(aws.proxy)
    assert "ec2:AssociateIamInstanceProfile" in seen and "ec2:ModifyLaunchTemplate" in seen
    denied = [action for action in seen if not support.policy_allows(policy, action)]
    assert denied == []
    # Associating or replacing a profile also needs iam:PassRole on its role (not visible to the proxy).
    assert support.policy_allows(policy, "iam:PassRole")

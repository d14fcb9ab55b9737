# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""fleetkeeper.aws.asg_metadata_options against the moto server, through the fault proxy.

Each module run goes through a real ansible-playbook process (run_module). IMDSv1 use is fed to
CloudWatch with PutMetricData on the same endpoint, as EC2 would publish MetadataNoToken.
"""

from __future__ import annotations

import json
import os

import pytest

from lab import fleet as fleet_support
from lab import instance_profile as support
from lab import metadata_options as imds
from lab.ansiblerun import run_module

MODULE = "fleetkeeper.aws.asg_metadata_options"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIRED = {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled",
            "InstanceMetadataTags": "disabled"}


@pytest.fixture
def estate(aws):
    """web: 3 on $Latest (one instance already requires tokens), worker: 2 pinned to version 1,
    batch: 2 on a mixed instances policy following $Default. All launched with IMDSv1 allowed."""
    ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
    fleet = fleet_support.create_network(ec2, "us-east-1")
    fleet_support.create_group(ec2, autoscaling, fleet, "web", 3, tags={"tier": "front"})
    fleet_support.create_group(ec2, autoscaling, fleet, "worker", 2, tags={"tier": "back"})
    support.pin_group(autoscaling, "worker", fleet.launch_templates["worker-lt"], "1")
    support.create_mixed_group(ec2, autoscaling, fleet, "batch", 2)
    ec2.modify_instance_metadata_options(InstanceId=fleet.groups["web"][0], HttpTokens="required",
                                         HttpPutResponseHopLimit=1, HttpEndpoint="enabled",
                                         InstanceMetadataTags="disabled")
    aws.proxy.reset()
    return {"fleet": fleet, "ec2": ec2, "autoscaling": autoscaling, "cloudwatch": aws.client("cloudwatch"),
            "instances": [i for ids in fleet.groups.values() for i in ids]}


def args(aws, **extra):
    base = {"names": ["web", "worker", "batch"], "endpoint_url": aws.endpoint_url,
            "metadata_options": {"http_tokens": "required", "http_put_response_hop_limit": 1}}
    base.update(extra)
    return base


@pytest.mark.compat
def test_check_mode_then_apply_then_idempotent(aws, estate):
    ec2, autoscaling, fleet = estate["ec2"], estate["autoscaling"], estate["fleet"]
    web0 = fleet.groups["web"][0]

    check = run_module(MODULE, args(aws), env=aws.env(), check=True, diff=True)
    assert not check.failed, check.result
    assert check.changed
    assert support.write_calls(aws.proxy) == []
    summary = check["summary"]
    assert (summary["modified"], summary["unchanged"], summary["launch_template_versions_created"]) == (6, 1, 3)
    assert summary["imdsv1_instances"] == 0 and check["refused_groups"] == []
    # The seven instances are read with one DescribeInstances call; the six that still accept IMDSv1 are
    # checked with one GetMetricData call.
    assert aws.proxy.count("ec2", "DescribeInstances") == 1
    assert aws.proxy.count("monitoring", "GetMetricData") == 1
    diff = check["diff"]
    assert diff["after"]["worker"]["LaunchTemplate worker-lt"] == {
        "version": "2", "uses_version": 2,
        "metadata_options": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1}}
    assert diff["before"]["worker"]["LaunchTemplate worker-lt"]["metadata_options"] is None
    assert web0 not in diff["after"]["web"]["instances"]
    assert set(diff["after"]["batch"]) == {"MixedInstancesPolicy batch-lt", "instances"}

    aws.proxy.reset()
    applied = run_module(MODULE, args(aws), env=aws.env(), diff=True)
    assert not applied.failed, applied.result
    assert applied.changed and applied["summary"] == summary
    assert applied["diff"] == diff  # check mode told exactly what was done
    assert aws.proxy.count("ec2", "ModifyInstanceMetadataOptions") == 6
    assert aws.proxy.count("ec2", "CreateLaunchTemplateVersion") == 3
    options = imds.options_of_instances(ec2, estate["instances"])
    assert all(o == REQUIRED for o in options.values()), options  # other fields kept as they were
    for name, spec in (("web", "$Latest"), ("worker", "2"), ("batch", "$Default")):
        version, data = imds.template_data(ec2, autoscaling, name)
        assert version == spec, name
        assert data["MetadataOptions"] == {"HttpTokens": "required", "HttpPutResponseHopLimit": 1}, name
        assert data["ImageId"] == fleet_support.AMI_ID, name  # made from the followed version (SourceVersion)

    aws.proxy.reset()
    again = run_module(MODULE, args(aws), env=aws.env(), diff=True)
    assert not again.failed and not again.changed, again.result
    assert again["diff"] == {"before": {}, "after": {}}
    assert support.write_calls(aws.proxy) == []
    assert aws.proxy.count("monitoring", "GetMetricData") == 0  # nothing answers IMDSv1 any more

    # Hop limit 2 for container hosts: only that field moves.
    hop = run_module(MODULE, args(aws, names=["batch"], metadata_options={"http_put_response_hop_limit": 2}),
                     env=aws.env())
    assert hop.changed and hop["summary"]["modified"] == 2
    for value in imds.options_of_instances(ec2, fleet.groups["batch"]).values():
        assert value == dict(REQUIRED, HttpPutResponseHopLimit=2)


def test_imdsv1_users_refuse_their_group(aws, estate):
    fleet, cloudwatch = estate["fleet"], estate["cloudwatch"]
    worker1 = fleet.groups["worker"][1]
    imds.put_v1_calls(cloudwatch, worker1, 12, days_ago=3)
    imds.put_v1_calls(cloudwatch, worker1, 5, days_ago=10)
    imds.put_v1_calls(cloudwatch, fleet.groups["web"][1], 40, days_ago=20)  # outside the 14-day window
    aws.proxy.reset()

    # A dry run that only looks (tokens stay optional) lists the IMDSv1 users and refuses nothing.
    look = run_module(MODULE, args(aws, metadata_options={"http_tokens": "optional"}), env=aws.env(), check=True)
    assert not look.failed, look.result
    assert look["imdsv1_instances"] == [{"instance_id": worker1, "group": "worker", "calls": 17}]
    assert [w for w in look.result.get("warnings", []) if "IMDSv1" in w], look.result
    # Each warning once, and no deprecation: amazon.aws 11 copies warnings into exit_json, which core 2.19+
    # reports as deprecated (aws_calls.module_warn).
    assert len(set(look.result["warnings"])) == len(look.result["warnings"]), look.result["warnings"]
    assert not look.result.get("deprecations"), look.result["deprecations"]

    dry = run_module(MODULE, args(aws), env=aws.env(), check=True)
    assert dry.failed and dry["refused_groups"] == ["worker"]
    assert worker1 in dry["msg"] and "force: true" in dry["msg"]
    assert support.write_calls(aws.proxy) == []

    real = run_module(MODULE, args(aws), env=aws.env())
    assert real.failed and real["refused_groups"] == ["worker"] and real["failed_groups"] == []
    statuses = {g["name"]: g["status"] for g in real["groups"]}
    assert statuses == {"batch": "changed", "web": "changed", "worker": "refused"}
    options = imds.options_of_instances(estate["ec2"], estate["instances"])
    assert {options[i]["HttpTokens"] for i in fleet.groups["worker"]} == {"optional"}  # nothing of it changed
    assert imds.template_data(estate["ec2"], estate["autoscaling"], "worker")[0] == "1"
    assert {options[i]["HttpTokens"] for i in fleet.groups["web"] + fleet.groups["batch"]} == {"required"}

    # A wider window sees the old calls too; a narrower one only the recent ones.
    wide = run_module(MODULE, args(aws, imdsv1_window_days=30), env=aws.env(), check=True)
    assert wide["refused_groups"] == ["worker"]  # web requires tokens now: not read again
    narrow = run_module(MODULE, args(aws, names=["worker"], imdsv1_window_days=5), env=aws.env(), check=True)
    assert narrow["imdsv1_instances"] == [{"instance_id": worker1, "group": "worker", "calls": 12}]

    forced = run_module(MODULE, args(aws, force=True), env=aws.env())
    assert not forced.failed and forced.changed, forced.result
    assert forced["imdsv1_instances"][0]["instance_id"] == worker1
    assert any("force: true" in w for w in forced.result.get("warnings", []))
    options = imds.options_of_instances(estate["ec2"], fleet.groups["worker"])
    assert {o["HttpTokens"] for o in options.values()} == {"required"}


def test_metrics_unreadable_changes_nothing(aws, estate):
    aws.proxy.inject("deny", service="monitoring", operation="GetMetricData")
    result = run_module(MODULE, args(aws), env=aws.env())
    assert result.failed and "GetMetricData" in result["msg"] and "nothing was changed" in result["msg"]
    assert support.write_calls(aws.proxy) == []


def test_failure_in_one_group_leaves_the_others_done(aws, estate):
    fleet = estate["fleet"]
    aws.proxy.inject("error", service="ec2", operation="ModifyInstanceMetadataOptions", code="InternalError",
                     where={"InstanceId": fleet.groups["batch"]})
    result = run_module(MODULE, args(aws), env=aws.env())
    assert result.failed
    statuses = {g["name"]: g["status"] for g in result["groups"]}
    assert statuses == {"batch": "failed", "web": "changed", "worker": "changed"}
    assert result["failed_groups"] == ["batch"]
    assert "'batch'" in result["msg"] and "InternalError" in result["msg"] and "Finished: web, worker" in result["msg"]
    options = imds.options_of_instances(estate["ec2"], estate["instances"])
    assert {options[i]["HttpTokens"] for i in fleet.groups["batch"]} == {"optional"}
    assert {options[i]["HttpTokens"] for i in fleet.groups["web"] + fleet.groups["worker"]} == {"required"}
    aws.proxy.clear_faults()
    again = run_module(MODULE, args(aws), env=aws.env())
    assert not again.failed and [g["name"] for g in again["groups"] if g["changed"]] == ["batch"]


@pytest.mark.compat
def test_bad_input_fails_before_any_change(aws, estate):
    nothing = run_module(MODULE, args(aws, metadata_options={}), env=aws.env())
    assert nothing.failed and "at least one" in nothing["msg"]
    hops = run_module(MODULE, args(aws, metadata_options={"http_put_response_hop_limit": 65}), env=aws.env())
    assert hops.failed and "between 1 and 64" in hops["msg"]
    tokens = run_module(MODULE, args(aws, metadata_options={"http_tokens": "sometimes"}), env=aws.env())
    assert tokens.failed and "http_tokens" in tokens["msg"]
    window = run_module(MODULE, args(aws, imdsv1_window_days=0), env=aws.env())
    assert window.failed and "imdsv1_window_days" in window["msg"]
    unknown = run_module(MODULE, args(aws, names=["web", "nope"]), env=aws.env())
    assert unknown.failed and "nope" in unknown["msg"]
    assert support.write_calls(aws.proxy) == []


def test_operations_are_allowed_by_the_documented_policy(aws, estate):
    run_module(MODULE, args(aws, launch_template_version="default", force=True), env=aws.env())
    run_module(MODULE, args(aws, metadata_options={"http_tokens": "optional"}), env=aws.env(), check=True)
    seen = support.iam_actions(aws.proxy)
    assert "ec2:ModifyInstanceMetadataOptions" in seen and "cloudwatch:GetMetricData" in seen
    for name in ("metadata_options.json", "instance_profile.json"):
        with open(os.path.join(REPO, "docs", "iam", name), encoding="utf-8") as handle:
            policy = json.load(handle)
        assert [a for a in seen if not support.policy_allows(policy, a)] == [], name

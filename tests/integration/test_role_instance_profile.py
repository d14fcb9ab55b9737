# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleetkeeper.aws.instance_profile role (via the fleetkeeper.aws.instance_profiles playbook) on moto."""

from __future__ import annotations

import pytest

import json
import os

import yaml

from lab import fleet as fleet_support
from lab import instance_profile as support
from lab import metadata_options as imds
from lab.ansiblerun import run_playbook

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READ_S3 = {"Version": "2012-10-17",
           "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::keys/*"}]}
MANAGED = "arn:aws:iam::123456789012:policy/fleet-ssm"


def play(aws, **variables):
    base = {
        "instance_profile_name": "fleet-app",
        "instance_profile_aws_endpoint_url": aws.endpoint_url,
        "instance_profile_aws_region": "us-east-1",
        "instance_profile_asg_tag_filters": {"fleetkeeper:fleet": "*"},
        "instance_profile_inline_policies": {"read-keys": READ_S3, "as-text": json.dumps(READ_S3)},
        "instance_profile_managed_policies": [MANAGED],
        "instance_profile_replace": True,
    }
    base.update(variables)
    return yaml.safe_dump([{
        "name": "instance profile role under test",
        "hosts": "localhost",
        "gather_facts": False,
        "vars": base,
        "roles": [{"role": "fleetkeeper.aws.instance_profile"}],
    }])


PREFIX = "fleetkeeper.aws.instance_profile : "
ROLLOUT = PREFIX + "Roll the instance profile onto the target Auto Scaling groups"
METADATA = PREFIX + "Roll the instance metadata options onto the target Auto Scaling groups"


def changed_tasks(run):
    return [t.name[len(PREFIX):] if t.name.startswith(PREFIX) else t.name for t in run.tasks if t.changed]


def create_managed_policy(iam):
    # A customer managed policy: moto's server loads AWS managed policies only when told to at start.
    iam.create_policy(PolicyName="fleet-ssm", PolicyDocument=json.dumps(READ_S3))


def test_role_converges_idempotently_and_detaches(aws):
    ec2, autoscaling, iam = aws.client("ec2"), aws.client("autoscaling"), aws.client("iam")
    fleet = fleet_support.demo_fleet(aws)
    legacy = support.create_profile(iam, "legacy")
    web0 = fleet.groups["web"][0]
    ec2.associate_iam_instance_profile(InstanceId=web0, IamInstanceProfile={"Arn": legacy})
    managed = MANAGED
    instances = [i for ids in fleet.groups.values() for i in ids]

    check = run_playbook(play(aws, instance_profile_managed_policies=[]), env=aws.env(), check=True, diff=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Create or update the IAM role with the EC2 trust policy and managed policies" in changed_tasks(check)
    rollout = check.task(ROLLOUT)
    assert rollout.changed and rollout["summary"]["associated"] == 4 and rollout["summary"]["replaced"] == 1
    metadata = check.task(METADATA)
    assert metadata.changed and metadata["summary"]["modified"] == 5 and metadata["imdsv1_instances"] == []
    assert iam.list_roles()["Roles"] == [r for r in iam.list_roles()["Roles"] if r["RoleName"] == "legacy"]

    first = run_playbook(play(aws, instance_profile_managed_policies=[]), env=aws.env())
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.task(ROLLOUT)["summary"]["replaced"] == 1
    role = iam.get_role(RoleName="fleet-app")["Role"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert sorted(iam.list_role_policies(RoleName="fleet-app")["PolicyNames"]) == ["as-text", "read-keys"]
    profile = iam.get_instance_profile(InstanceProfileName="fleet-app")["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == ["fleet-app"]
    assert set(support.profile_of_instances(ec2, instances).values()) == {profile["Arn"]}
    for name in fleet.groups:
        # Both roll-outs made a version; the second kept the first's profile (SourceVersion).
        assert support.group_template(ec2, autoscaling, name)[2] == {"Arn": profile["Arn"]}
        assert imds.template_data(ec2, autoscaling, name)[1]["MetadataOptions"] == {
            "HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"}
    assert {o["HttpTokens"] for o in imds.options_of_instances(ec2, instances).values()} == {"required"}

    second = run_playbook(play(aws, instance_profile_managed_policies=[]), env=aws.env())
    assert second.returncode == 0, second.stdout + second.stderr
    assert changed_tasks(second) == []

    # A policy dropped from the list is deleted; a managed policy is attached.
    create_managed_policy(iam)
    third = run_playbook(play(aws, instance_profile_inline_policies={"read-keys": READ_S3},
                              instance_profile_managed_policies=[managed]), env=aws.env())
    assert third.returncode == 0, third.stdout + third.stderr
    assert iam.list_role_policies(RoleName="fleet-app")["PolicyNames"] == ["read-keys"]
    assert [p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName="fleet-app")["AttachedPolicies"]] == \
        [managed]

    absent = run_playbook(play(aws, instance_profile_state="absent"), env=aws.env())
    assert absent.returncode == 0, absent.stdout + absent.stderr
    assert set(support.profile_of_instances(ec2, instances).values()) == {None}
    assert [r["RoleName"] for r in iam.list_roles()["Roles"]] == ["legacy"]
    assert [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]] == ["legacy"]
    again = run_playbook(play(aws, instance_profile_state="absent"), env=aws.env())
    assert again.returncode == 0 and changed_tasks(again) == [], again.stdout


def test_imdsv1_users_stop_the_role_until_forced(aws):
    ec2 = aws.client("ec2")
    fleet = fleet_support.demo_fleet(aws)
    user = fleet.groups["web"][1]
    imds.put_v1_calls(aws.client("cloudwatch"), user, 30, days_ago=2)
    create_managed_policy(aws.client("iam"))
    run = run_playbook(play(aws), env=aws.env())
    assert run.returncode != 0
    failure = run.task(METADATA)
    assert failure.failed and failure["refused_groups"] == ["web"] and user in failure["msg"]
    options = imds.options_of_instances(ec2, [i for ids in fleet.groups.values() for i in ids])
    assert {options[i]["HttpTokens"] for i in fleet.groups["web"]} == {"optional"}
    forced = run_playbook(play(aws, instance_profile_metadata_force=True), env=aws.env())
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert forced.task(METADATA)["imdsv1_instances"][0]["instance_id"] == user
    # Leaving the options alone: the task is skipped.
    untouched = run_playbook(play(aws, instance_profile_metadata_options={}), env=aws.env())
    assert untouched.returncode == 0 and changed_tasks(untouched) == []


def test_invalid_policy_json_is_named_and_nothing_changes(aws):
    fleet_support.demo_fleet(aws)
    aws.proxy.reset()
    run = run_playbook(play(aws, instance_profile_inline_policies={
        "good": READ_S3, "broken-one": '{"Version": "2012-10-17", "Statement": [}'}), env=aws.env())
    assert run.returncode != 0
    failure = run.task(PREFIX + "Name the inline policies that are not valid JSON")
    assert failure.failed and "broken-one" in failure["msg"] and "good" not in failure["msg"].split("is not")[0]
    assert aws.proxy.count() == 0  # nothing was even read

    not_a_policy = run_playbook(play(aws, instance_profile_inline_policies={"list": "[1, 2]"}), env=aws.env())
    assert not_a_policy.returncode != 0
    assert "list is valid JSON but not an IAM policy" in not_a_policy.stdout
    assert aws.proxy.count() == 0


@pytest.mark.compat
def test_argument_spec_rejects_bad_variables(aws):
    run = run_playbook(play(aws, instance_profile_launch_template_version="newest"), env=aws.env())
    assert run.returncode != 0 and "instance_profile_launch_template_version" in run.stdout
    tokens = run_playbook(play(aws, instance_profile_metadata_options={"http_tokens": "sometimes"}), env=aws.env())
    assert tokens.returncode != 0 and "http_tokens" in tokens.stdout
    assert aws.proxy.count() == 0


def test_role_and_module_operations_are_allowed_by_the_documented_policy(aws):
    fleet_support.demo_fleet(aws)
    create_managed_policy(aws.client("iam"))
    aws.proxy.reset()
    for variables in ({}, {"instance_profile_inline_policies": {"read-keys": READ_S3}},
                      {"instance_profile_state": "absent"}):
        run = run_playbook(play(aws, **variables), env=aws.env())
        assert run.returncode == 0, run.stdout + run.stderr
    with open(os.path.join(REPO, "docs", "iam", "instance_profile.json"), encoding="utf-8") as handle:
        policy = json.load(handle)
    seen = support.iam_actions(aws.proxy)
    assert "iam:CreateRole" in seen and "ec2:AssociateIamInstanceProfile" in seen
    assert "ec2:ModifyInstanceMetadataOptions" in seen and "cloudwatch:GetMetricData" in seen
    assert [a for a in seen if not support.policy_allows(policy, a)] == []

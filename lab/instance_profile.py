# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fleets for the instance profile tests, the Molecule scenario and the benchmark.

Builds on lab/fleet.py: IAM roles and instance profiles, groups on a
mixed instances policy or a launch configuration, instances already carrying
another profile, and readers that report what EC2 holds afterwards.
"""

from __future__ import annotations

import fnmatch
import json

from lab import fleet as fleet_support

EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}
WRITE_PREFIXES = ("Associate", "Replace", "Disassociate", "Create", "Modify", "Update", "Start", "Put", "Delete",
                  "Add", "Remove", "Attach", "Detach", "Tag", "Untag")


def create_profile(iam, name, role=True):
    """An instance profile (with a role of the same name) and its ARN."""
    if role:
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST))
    profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    if role:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return profile["Arn"]


def create_mixed_group(ec2, autoscaling, fleet, name, size, version="$Default"):
    """An ASG on a mixed instances policy whose template has no profile."""
    template = ec2.create_launch_template(LaunchTemplateName=f"{name}-lt",
                                          LaunchTemplateData={"ImageId": fleet_support.AMI_ID,
                                                              "InstanceType": "t3.small"})
    template_id = template["LaunchTemplate"]["LaunchTemplateId"]
    fleet.launch_templates[f"{name}-lt"] = template_id
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name,
        MixedInstancesPolicy={
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateId": template_id, "Version": version},
                "Overrides": [{"InstanceType": "t3.small"}, {"InstanceType": "t3.medium"}],
            },
        },
        MinSize=0, MaxSize=max(size, 1) * 2, DesiredCapacity=size,
        VPCZoneIdentifier=fleet.private_subnet,
    )
    described = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    fleet.groups[name] = [i["InstanceId"] for i in described["Instances"]]
    return fleet.groups[name]


def create_launch_configuration_group(autoscaling, fleet, name):
    autoscaling.create_launch_configuration(LaunchConfigurationName=f"{name}-lc", ImageId=fleet_support.AMI_ID,
                                            InstanceType="t3.small")
    autoscaling.create_auto_scaling_group(AutoScalingGroupName=name, LaunchConfigurationName=f"{name}-lc",
                                          MinSize=0, MaxSize=2, DesiredCapacity=1,
                                          VPCZoneIdentifier=fleet.private_subnet)


def pin_group(autoscaling, name, template_id, version):
    autoscaling.update_auto_scaling_group(AutoScalingGroupName=name,
                                          LaunchTemplate={"LaunchTemplateId": template_id, "Version": version})


def profile_of_instances(ec2, instance_ids):
    """{instance id: profile ARN or None} from DescribeIamInstanceProfileAssociations (live associations)."""
    found = {i: None for i in instance_ids}
    paginator = ec2.get_paginator("describe_iam_instance_profile_associations")
    for page in paginator.paginate(Filters=[{"Name": "instance-id", "Values": list(instance_ids)}]):
        for record in page["IamInstanceProfileAssociations"]:
            if record["State"] in ("associating", "associated"):
                found[record["InstanceId"]] = record["IamInstanceProfile"]["Arn"]
    return found


def group_template(ec2, autoscaling, name):
    """(template id, the group's Version spec, the IamInstanceProfile of the version it resolves to)."""
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    spec = group.get("LaunchTemplate") or group["MixedInstancesPolicy"]["LaunchTemplate"]["LaunchTemplateSpecification"]
    version = spec.get("Version") or "$Default"
    record = ec2.describe_launch_template_versions(LaunchTemplateId=spec["LaunchTemplateId"],
                                                   Versions=[version])["LaunchTemplateVersions"][0]
    return spec["LaunchTemplateId"], spec.get("Version"), record["LaunchTemplateData"].get("IamInstanceProfile")


def write_calls(proxy):
    """Calls through the proxy that change something (by operation name)."""
    return [c for c in proxy.calls() if c.operation.startswith(WRITE_PREFIXES)]


def policy_allows(policy, action):
    """True if an Allow statement of ``policy`` names ``action`` (wildcards as IAM reads them)."""
    for statement in policy["Statement"]:
        if statement.get("Effect") != "Allow":
            continue
        actions = statement.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        if any(fnmatch.fnmatchcase(action.lower(), pattern.lower()) for pattern in actions):
            return True
    return False


def iam_actions(proxy):
    """IAM action names (service:Operation) for every call the proxy saw, excluding test set-up.

    The SigV4 service name is the IAM prefix except for CloudWatch (signed as ``monitoring``)."""
    prefixes = {"monitoring": "cloudwatch"}
    return sorted({f"{prefixes.get(c.service, c.service)}:{c.operation}" for c in proxy.calls()})


# --------------------------------------------------------------------------
# Command line, for the Molecule scenario and the benchmark:
#   python -m lab.instance_profile seed --endpoint-url URL
#   python -m lab.instance_profile associations --endpoint-url URL
# --------------------------------------------------------------------------

def _clients(endpoint_url, region):
    import boto3  # pylint: disable=import-outside-toplevel

    from lab.awsemu import TEST_CREDENTIALS  # pylint: disable=import-outside-toplevel

    def client(service):
        return boto3.client(service, region_name=region, endpoint_url=endpoint_url,
                            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    return client("ec2"), client("autoscaling"), client("iam")


def seed(endpoint_url, region="us-east-1", groups=None, tag="fleetkeeper:fleet"):
    """A network, groups tagged ``tag`` and a 'legacy' profile on the first instance of the first group."""
    ec2, autoscaling, iam = _clients(endpoint_url, region)
    fleet = fleet_support.create_network(ec2, region)
    for name, size in (groups or {"web": 3, "worker": 2}).items():
        fleet_support.create_group(ec2, autoscaling, fleet, name, size, tags={tag: name})
    legacy = create_profile(iam, "legacy")
    first = next(iter(fleet.groups.values()))[0]
    ec2.associate_iam_instance_profile(InstanceId=first, IamInstanceProfile={"Arn": legacy})
    return {"groups": fleet.groups, "legacy_instance": first, "legacy_arn": legacy}


def associations(endpoint_url, region="us-east-1"):
    """{instance id: profile ARN or None} for every instance of every Auto Scaling group."""
    ec2, autoscaling, _iam = _clients(endpoint_url, region)
    ids = [i["InstanceId"] for page in autoscaling.get_paginator("describe_auto_scaling_groups").paginate()
           for g in page["AutoScalingGroups"] for i in g["Instances"]]
    return profile_of_instances(ec2, ids) if ids else {}


def main(argv=None):
    import argparse  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(description="instance profile test fleets")
    parser.add_argument("command", choices=["seed", "associations"])
    parser.add_argument("--endpoint-url", required=True)
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args(argv)
    if args.command == "seed":
        print(json.dumps(seed(args.endpoint_url, args.region)))
    else:
        print(json.dumps(associations(args.endpoint_url, args.region)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

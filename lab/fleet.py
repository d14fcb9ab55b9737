# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Build small Auto Scaling fleets on the embedded endpoint (tests, demo, benchmarks).

One place that knows how to lay out a VPC with a public and a private subnet,
a bastion instance, launch templates and Auto Scaling groups, and a bucket of
operators' public keys.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

AMI_ID = "ami-12c6146b"  # one of moto's built-in AMIs


@dataclass
class Fleet:
    region: str
    vpc_id: str
    vpc_cidr: str
    public_subnet: str
    private_subnet: str
    bastion_id: str | None = None
    launch_templates: dict = field(default_factory=dict)   # name -> id
    groups: dict = field(default_factory=dict)             # ASG name -> [instance ids]


def ssh_keypair(comment: str) -> tuple[str, bytes]:
    """A fresh ed25519 key pair: (public key line, private key in OpenSSH PEM)."""
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    return f"{public.decode()} {comment}", private


def create_network(ec2, region: str, cidr: str = "10.42.0.0/16") -> Fleet:
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    prefix = cidr.split(".")[:2]
    public = ec2.create_subnet(VpcId=vpc, CidrBlock=".".join(prefix + ["0", "0/24"]),
                               AvailabilityZone=f"{region}a")["Subnet"]["SubnetId"]
    ec2.modify_subnet_attribute(SubnetId=public, MapPublicIpOnLaunch={"Value": True})
    private = ec2.create_subnet(VpcId=vpc, CidrBlock=".".join(prefix + ["1", "0/24"]),
                                AvailabilityZone=f"{region}b")["Subnet"]["SubnetId"]
    return Fleet(region=region, vpc_id=vpc, vpc_cidr=cidr, public_subnet=public, private_subnet=private)


def create_bastion(ec2, fleet: Fleet, name: str = "bastion") -> str:
    reservation = ec2.run_instances(
        ImageId=AMI_ID, MinCount=1, MaxCount=1, InstanceType="t3.micro",
        NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": fleet.public_subnet, "AssociatePublicIpAddress": True}],
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": "Name", "Value": name}, {"Key": "fleetkeeper:role", "Value": "bastion"}]}],
    )
    fleet.bastion_id = reservation["Instances"][0]["InstanceId"]
    return fleet.bastion_id


def create_group(ec2, autoscaling, fleet: Fleet, name: str, size: int, instance_type: str = "t3.small",
                 tags: dict | None = None, instance_profile_arn: str | None = None) -> list:
    """A launch template and an ASG of ``size`` instances in the private subnet; returns instance ids."""
    data = {"ImageId": AMI_ID, "InstanceType": instance_type}
    if instance_profile_arn:
        data["IamInstanceProfile"] = {"Arn": instance_profile_arn}
    template = ec2.create_launch_template(LaunchTemplateName=f"{name}-lt", LaunchTemplateData=data)
    template_id = template["LaunchTemplate"]["LaunchTemplateId"]
    fleet.launch_templates[f"{name}-lt"] = template_id
    asg_tags = [{"Key": k, "Value": v, "PropagateAtLaunch": True, "ResourceId": name,
                 "ResourceType": "auto-scaling-group"} for k, v in (tags or {}).items()]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateId": template_id, "Version": "$Latest"},
        MinSize=0, MaxSize=max(size, 1) * 2, DesiredCapacity=size,
        VPCZoneIdentifier=fleet.private_subnet,
        Tags=asg_tags,
    )
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    fleet.groups[name] = [i["InstanceId"] for i in group["Instances"]]
    return fleet.groups[name]


def upload_keys(s3, bucket: str, users: dict, prefix: str = "keys/", create: bool = True) -> None:
    """Put ``users`` ({username: key text}) as ``PREFIX<username>.pub`` objects."""
    if create:
        s3.create_bucket(Bucket=bucket)
    for user, text in users.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}{user}.pub", Body=text.encode())


def write_private_key(directory: str, name: str, private: bytes) -> str:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(private)
    return path


def demo_fleet(emulator, region: str = "us-east-1", groups: dict | None = None) -> Fleet:
    """The demo's fleet: network, bastion, and two ASGs (web: 3, worker: 2) by default."""
    ec2 = emulator.client("ec2", region)
    autoscaling = emulator.client("autoscaling", region)
    fleet = create_network(ec2, region)
    create_bastion(ec2, fleet)
    for name, size in (groups or {"web": 3, "worker": 2}).items():
        create_group(ec2, autoscaling, fleet, name, size, tags={"fleetkeeper:fleet": name})
    return fleet


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()

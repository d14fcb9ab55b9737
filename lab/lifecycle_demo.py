# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The AWS side of the lifecycle loop on the embedded endpoint, for the Molecule scenario and the demo.

    python -m lab.lifecycle_demo seed --endpoint-url URL      # network, empty ASG "web", SQS queue
    python -m lab.lifecycle_demo scale --endpoint-url URL --desired 1
    python -m lab.lifecycle_demo receive --endpoint-url URL --queue-url Q   # next launch notification
    python -m lab.lifecycle_demo states --endpoint-url URL    # {instance id: lifecycle state}

Each prints one JSON document. Only loopback endpoints are accepted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse

import boto3

from lab import fleet as fleet_support
from lab.awsemu import TEST_CREDENTIALS

GROUP = "web"
QUEUE = "fleetkeeper-lifecycle"


def client(service, endpoint_url):
    host = urllib.parse.urlsplit(endpoint_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing a non-loopback endpoint: {endpoint_url}")
    return boto3.client(service, region_name="us-east-1", endpoint_url=endpoint_url,
                        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def seed(endpoint_url):
    ec2, autoscaling, sqs = (client(s, endpoint_url) for s in ("ec2", "autoscaling", "sqs"))
    if not autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"]:
        fleet = fleet_support.create_network(ec2, "us-east-1")
        fleet_support.create_group(ec2, autoscaling, fleet, GROUP, 0, tags={"fleetkeeper:fleet": GROUP})
    url = sqs.create_queue(QueueName=QUEUE)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return {"group": GROUP, "queue_url": url, "queue_arn": arn}


def scale(endpoint_url, desired):
    autoscaling = client("autoscaling", endpoint_url)
    autoscaling.update_auto_scaling_group(AutoScalingGroupName=GROUP, MaxSize=max(desired, 1), DesiredCapacity=desired)
    return states(endpoint_url)


def receive(endpoint_url, queue_url, timeout):
    """The next launch notification (test notifications are deleted and skipped)."""
    sqs = client("sqs", endpoint_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=1,
                                           WaitTimeSeconds=2).get("Messages", []):
            body = json.loads(message["Body"])
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            if body.get("Event") == "autoscaling:TEST_NOTIFICATION":
                continue
            return body
    raise SystemExit(f"no launch notification within {timeout} s")


def states(endpoint_url):
    group = client("autoscaling", endpoint_url).describe_auto_scaling_groups(
        AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LifecycleState"] for i in group["Instances"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("command", choices=["seed", "scale", "receive", "states"])
    parser.add_argument("--endpoint-url", required=True)
    parser.add_argument("--desired", type=int, default=1)
    parser.add_argument("--queue-url")
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    if args.command == "seed":
        result = seed(args.endpoint_url)
    elif args.command == "scale":
        result = scale(args.endpoint_url, args.desired)
    elif args.command == "receive":
        result = receive(args.endpoint_url, args.queue_url, args.timeout)
    else:
        result = states(args.endpoint_url)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

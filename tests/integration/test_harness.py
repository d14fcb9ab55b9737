# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The embedded AWS endpoint itself: reset between tests, call counting, injected faults."""

from __future__ import annotations

import time

import boto3
import botocore.config
import botocore.exceptions
import pytest

NO_RETRY = botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"})


def test_endpoint_answers_and_counts_calls(aws):
    ec2 = aws.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    assert vpc in [v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"]]
    assert aws.proxy.count("ec2", "CreateVpc") == 1
    assert aws.proxy.count("ec2", "DescribeVpcs") == 1


def test_state_is_reset_between_tests(aws):
    ec2 = aws.client("ec2")
    assert [v for v in ec2.describe_vpcs()["Vpcs"] if v["CidrBlock"] == "10.9.0.0/16"] == []
    assert aws.proxy.count() == 1


def test_s3_operations_are_named(aws):
    s3 = aws.client("s3")
    s3.create_bucket(Bucket="harness")
    s3.put_object(Bucket="harness", Key="a/b.pub", Body=b"x")
    s3.list_objects_v2(Bucket="harness", Prefix="a/")
    s3.get_object(Bucket="harness", Key="a/b.pub")["Body"].read()
    assert aws.proxy.summary() == {"s3:CreateBucket": 1, "s3:GetObject": 1, "s3:ListObjectsV2": 1, "s3:PutObject": 1}


def test_throttling_is_retried_by_botocore(aws):
    aws.proxy.inject("throttle", service="autoscaling", times=2)
    autoscaling = aws.client("autoscaling")
    assert autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"] == []
    calls = aws.proxy.calls("autoscaling", "DescribeAutoScalingGroups")
    assert [c.injected for c in calls] == ["throttle", "throttle", None]


@pytest.mark.parametrize("kind,expected", [
    ("throttle", "RequestLimitExceeded"),
    ("deny", "UnauthorizedOperation"),
    ("error", "InternalError"),
])
def test_injected_errors_carry_the_service_error_code(aws, kind, expected):
    aws.proxy.inject(kind, service="ec2", operation="DescribeInstances")
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=aws.endpoint_url, config=NO_RETRY)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        ec2.describe_instances()
    assert info.value.response["Error"]["Code"] == expected
    ec2.describe_vpcs()  # other operations are untouched


def test_dropped_connection_and_truncated_body(aws):
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=aws.endpoint_url, config=NO_RETRY)
    s3.create_bucket(Bucket="cut")
    s3.put_object(Bucket="cut", Key="k", Body=b"0123456789" * 100)
    aws.proxy.inject("truncate", service="s3", operation="GetObject", times=1)
    with pytest.raises((botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError)):
        s3.get_object(Bucket="cut", Key="k")["Body"].read()
    # A dropped answer on a reused keep-alive connection is resent once by urllib3: drop both.
    aws.proxy.inject("drop", service="s3", operation="ListObjectsV2", times=2)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.list_objects_v2(Bucket="cut")
    assert s3.get_object(Bucket="cut", Key="k")["Body"].read() == b"0123456789" * 100


def test_latency_is_added_per_call(aws):
    ec2 = aws.client("ec2")
    ec2.describe_vpcs()
    aws.proxy.set_latency(200)
    start = time.monotonic()
    ec2.describe_vpcs()
    assert time.monotonic() - start >= 0.2


def test_a_call_that_began_before_a_reset_is_not_counted_after_it(aws):
    """A long poll still in flight when the next test starts (its process was stopped) belongs to no test."""
    import threading  # pylint: disable=import-outside-toplevel

    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName="harness-long-poll")["QueueUrl"]
    poll = threading.Thread(target=sqs.receive_message, kwargs={"QueueUrl": url, "WaitTimeSeconds": 3})
    poll.start()
    time.sleep(1)
    aws.proxy.reset()
    aws.client("ec2").describe_vpcs()
    poll.join()
    assert aws.proxy.summary() == {"ec2:DescribeVpcs": 1}


def test_a_stopped_upstream_and_a_client_that_hangs_up_print_no_traceback(capfd):
    """Tests stop moto or kill their client on purpose: the endpoint answers or ends quietly."""
    import socket  # pylint: disable=import-outside-toplevel

    from lab.awsemu import AwsEmulator  # pylint: disable=import-outside-toplevel

    emulator = AwsEmulator().start()
    try:
        # A client that sends a request and goes away before the (slow) answer.
        emulator.proxy.set_latency(300)
        host, port = emulator.proxy.server.server_address[:2]
        for _attempt in range(3):
            with socket.create_connection((host, port)) as sock:
                sock.sendall(b"GET /?Action=DescribeRegions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        time.sleep(0.8)
        emulator.proxy.set_latency(0)
        # The upstream stopped: a retryable 502 with an AWS error, not a dropped connection.
        emulator.moto.stop()
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=emulator.endpoint_url, config=NO_RETRY,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        with pytest.raises(botocore.exceptions.ClientError) as failure:
            ec2.describe_regions()
        assert failure.value.response["ResponseMetadata"]["HTTPStatusCode"] == 502
        assert failure.value.response["Error"]["Code"] == "ServiceUnavailable"
        assert "did not answer" in failure.value.response["Error"]["Message"]
        assert [c.injected for c in emulator.proxy.calls("ec2", "DescribeRegions")][-1] == "upstream-down"
    finally:
        emulator.stop()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Exception occurred" not in out + err, out + err

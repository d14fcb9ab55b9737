# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""fleetkeeper.aws.s3_key_notifications against moto: queue, policy, bucket notification; and moto's real events."""

from __future__ import annotations

import json

import pytest

from lab.ansiblerun import run_module

BUCKET = "fleet-keys"


def args(aws, **extra):
    return dict({"endpoint_url": aws.endpoint_url, "region": "us-east-1", "bucket": BUCKET,
                 "queue_name": "fleetkeeper-keys", "source_account": "123456789012"}, **extra)


def receive_all(sqs, url):
    bodies = []
    while True:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
        if not messages:
            return bodies
        for message in messages:
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


@pytest.mark.compat
def test_check_mode_then_create_then_nothing_to_do_and_events_arrive(aws):
    s3, sqs = aws.client("s3"), aws.client("sqs")
    s3.create_bucket(Bucket=BUCKET)
    check = run_module("fleetkeeper.aws.s3_key_notifications", args(aws), check=True, diff=True)
    assert check.changed and not check.failed, check.result
    assert check["changes"] == ["queue", "queue policy", "bucket notification"]
    assert check["queue_arn"] == "arn:aws:sqs:us-east-1:123456789012:fleetkeeper-keys"
    assert check["diff"]["before"]["notification"] is None
    wanted = {"Key": {"FilterRules": [{"Name": "prefix", "Value": "keys/"}]}}
    assert check["diff"]["after"]["notification"]["Filter"] == wanted
    assert sqs.list_queues().get("QueueUrls") is None, "check mode created nothing"
    assert "QueueConfigurations" not in s3.get_bucket_notification_configuration(Bucket=BUCKET)

    first = run_module("fleetkeeper.aws.s3_key_notifications", args(aws), diff=True)
    assert first.changed and not first.failed, first.result
    url = first["queue_url"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    policy = json.loads(attributes["Policy"])
    assert policy["Statement"] == [{
        "Sid": "FleetkeeperS3KeyEvents", "Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"},
        "Action": "sqs:SendMessage", "Resource": first["queue_arn"],
        "Condition": {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{BUCKET}"},
                      "StringEquals": {"aws:SourceAccount": "123456789012"}}}]
    assert (attributes["VisibilityTimeout"], attributes["MessageRetentionPeriod"]) == ("60", "3600")
    [configuration] = s3.get_bucket_notification_configuration(Bucket=BUCKET)["QueueConfigurations"]
    assert configuration["Id"] == "fleetkeeper-keys" and configuration["QueueArn"] == first["queue_arn"]
    assert sorted(configuration["Events"]) == ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]

    for check_mode in (True, False):
        again = run_module("fleetkeeper.aws.s3_key_notifications", args(aws), check=check_mode, diff=True)
        assert not again.changed and not again.failed, again.result
        assert again["diff"]["before"] == again["diff"]["after"]

    # moto's real notifications: S3's test event, then one record per change under the prefix only.
    s3.put_object(Bucket=BUCKET, Key="keys/alice.pub", Body=b"ssh-ed25519 AAAA alice\n")
    s3.put_object(Bucket=BUCKET, Key="elsewhere/x.pub", Body=b"x")
    s3.delete_object(Bucket=BUCKET, Key="keys/alice.pub")
    bodies = receive_all(sqs, url)
    assert bodies[0]["Event"] == "s3:TestEvent"
    assert [(b["Records"][0]["eventName"], b["Records"][0]["s3"]["object"]["key"]) for b in bodies[1:]] == [
        ("ObjectCreated:Put", "keys%2Falice.pub"), ("ObjectRemoved:Delete", "keys%2Falice.pub")]


def test_other_configurations_and_statements_stay_and_a_drifted_prefix_is_put_back(aws):
    s3, sqs = aws.client("s3"), aws.client("sqs")
    s3.create_bucket(Bucket=BUCKET)
    url = sqs.create_queue(QueueName="fleetkeeper-keys", Attributes={"Policy": json.dumps({
        "Version": "2012-10-17", "Statement": [{"Sid": "Theirs", "Effect": "Allow",
                                                "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
                                                "Action": "sqs:ReceiveMessage", "Resource": "*"}]})})["QueueUrl"]
    other = sqs.create_queue(QueueName="audit")["QueueUrl"]
    other_arn = sqs.get_queue_attributes(QueueUrl=other, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    audit = {"Id": "audit", "QueueArn": other_arn, "Events": ["s3:ObjectCreated:*"],
             "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "audit/"}]}}}
    s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={"QueueConfigurations": [audit]})
    assert run_module("fleetkeeper.aws.s3_key_notifications", args(aws)).changed
    found = {c["Id"]: c for c in s3.get_bucket_notification_configuration(Bucket=BUCKET)["QueueConfigurations"]}
    assert sorted(found) == ["audit", "fleetkeeper-keys"] and found["audit"]["QueueArn"] == other_arn
    sids = [s["Sid"] for s in json.loads(sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["Policy"])["Attributes"]["Policy"])["Statement"]]
    assert sids == ["Theirs", "FleetkeeperS3KeyEvents"]

    moved = run_module("fleetkeeper.aws.s3_key_notifications", args(aws, prefix="ssh/"), check=True, diff=True)
    assert moved.changed and moved["changes"] == ["bucket notification"]
    assert moved["diff"]["before"]["notification"]["Filter"]["Key"]["FilterRules"][0]["Value"] == "keys/"
    assert moved["diff"]["after"]["notification"]["Filter"]["Key"]["FilterRules"][0]["Value"] == "ssh/"

    removed = run_module("fleetkeeper.aws.s3_key_notifications", args(aws, state="absent"), diff=True)
    assert removed.changed and removed["changes"] == ["bucket notification", "queue policy"], removed.result
    assert [c["Id"] for c in s3.get_bucket_notification_configuration(Bucket=BUCKET)["QueueConfigurations"]] == [
        "audit"]
    sids = [s["Sid"] for s in json.loads(sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["Policy"])["Attributes"]["Policy"])["Statement"]]
    assert sids == ["Theirs"]
    assert not run_module("fleetkeeper.aws.s3_key_notifications", args(aws, state="absent")).changed


@pytest.mark.compat
def test_an_overlapping_configuration_and_bad_input_fail_clearly(aws):
    s3, sqs = aws.client("s3"), aws.client("sqs")
    s3.create_bucket(Bucket=BUCKET)
    other = sqs.create_queue(QueueName="everything")["QueueUrl"]
    other_arn = sqs.get_queue_attributes(QueueUrl=other, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={"QueueConfigurations": [
        {"Id": "everything", "QueueArn": other_arn, "Events": ["s3:ObjectRemoved:Delete"]}]})
    overlap = run_module("fleetkeeper.aws.s3_key_notifications", args(aws))
    assert overlap.failed and "'everything'" in overlap["msg"] and "overlapping" in overlap["msg"]
    assert "Traceback" not in str(overlap.result)
    fifo = run_module("fleetkeeper.aws.s3_key_notifications",
                      args(aws, queue_name="keys.fifo", message_retention_period=5))
    assert fifo.failed and "FIFO" in fifo["msg"] and "message_retention_period" in fifo["msg"]
    missing = run_module("fleetkeeper.aws.s3_key_notifications", args(aws, bucket="no-such-bucket"))
    assert missing.failed and "NoSuchBucket" in missing["msg"], missing.result
    assert missing.get("error", {}).get("code") == "NoSuchBucket"


# IAM action names of the operations (S3's notification operations are authorised under older names).
IAM_ACTIONS = {"s3:GetBucketNotificationConfiguration": "s3:GetBucketNotification",
               "s3:PutBucketNotificationConfiguration": "s3:PutBucketNotification"}


def test_operations_are_allowed_by_the_documented_policy(aws):
    """Every call the module makes (create, update, absent) is in docs/iam/s3_key_notifications.json."""
    import os  # pylint: disable=import-outside-toplevel

    from lab.instance_profile import policy_allows  # pylint: disable=import-outside-toplevel

    aws.client("s3").create_bucket(Bucket=BUCKET)
    aws.proxy.reset()
    run_module("fleetkeeper.aws.s3_key_notifications", args(aws))
    run_module("fleetkeeper.aws.s3_key_notifications", args(aws, visibility_timeout=90))
    run_module("fleetkeeper.aws.s3_key_notifications", args(aws, state="absent"))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(repo, "docs", "iam", "s3_key_notifications.json"), encoding="utf-8") as handle:
        policy = json.load(handle)
    seen = {IAM_ACTIONS.get(f"{c.service}:{c.operation}", f"{c.service}:{c.operation}") for c in aws.proxy.calls()}
    # sts:GetCallerIdentity (check mode on a missing queue only) needs no permission.
    assert {"sqs:CreateQueue", "sqs:SetQueueAttributes", "s3:PutBucketNotification"} <= seen, seen
    assert [a for a in sorted(seen) if not policy_allows(policy, a)] == []


def test_the_roles_notification_task_check_mode_then_idempotent(aws):
    """roles/bastion_keys/tasks/notifications.yml as the role runs it (delegated to the controller)."""
    from lab.ansiblerun import run_playbook  # pylint: disable=import-outside-toplevel

    s3, sqs = aws.client("s3"), aws.client("sqs")
    s3.create_bucket(Bucket=BUCKET)
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": [{
        "name": "notifications", "ansible.builtin.include_role": {
            "name": "fleetkeeper.aws.bastion_keys", "tasks_from": "notifications.yml"},
        "vars": {"bastion_keys_bucket": BUCKET, "bastion_keys_region": "us-east-1",
                 "bastion_keys_notifications_endpoint_url": aws.endpoint_url,
                 "bastion_keys_notifications_queue_name": "role-keys"}}]}]
    name = "fleetkeeper.aws.bastion_keys : Send the key bucket's S3 events on the prefix to the keysync rulebook's SQS queue"
    check = run_playbook(play, env=aws.env(), check=True, diff=True)
    assert check.returncode == 0 and check.task(name).changed, check.stdout[-3000:]
    assert sqs.list_queues().get("QueueUrls") is None
    first = run_playbook(play, env=aws.env())
    assert first.returncode == 0 and first.task(name).changed
    assert first.task(name)["notification"]["Filter"]["Key"]["FilterRules"] == [{"Name": "prefix", "Value": "keys/"}]
    again = run_playbook(play, env=aws.env())
    assert again.returncode == 0 and not again.task(name).changed
    assert "[WARNING]" not in first.stderr + again.stderr, first.stderr + again.stderr

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planning of s3_key_notifications over botocore-shaped dictionaries, and S3's destination check retried."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError

from ansible_collections.fleetkeeper.aws.plugins.module_utils import s3_key_notifications as kn

ARN = "arn:aws:sqs:us-east-1:123456789012:fleetkeeper-keys"


def test_s3s_own_spelling_of_a_stored_configuration_is_no_change():
    # Real S3 returns the rule names capitalised and the events in its own order.
    stored = {"QueueConfigurations": [{"Id": "fleetkeeper-keys", "QueueArn": ARN,
                                       "Events": ["s3:ObjectRemoved:*", "s3:ObjectCreated:*"],
                                       "Filter": {"Key": {"FilterRules": [{"Name": "Prefix", "Value": "keys/"}]}}}],
              "ResponseMetadata": {"HTTPStatusCode": 200}}
    desired = kn.desired_configuration("fleetkeeper-keys", ARN, kn.EVENTS, "keys/")
    new, before, after = kn.plan_bucket(stored, desired, "fleetkeeper-keys")
    assert new is None and before == after


def test_other_configurations_and_eventbridge_are_put_back():
    lambda_conf = {"Id": "thumbs", "LambdaFunctionArn": "arn:aws:lambda:us-east-1:1:function:t",
                   "Events": ["s3:ObjectCreated:*"], "Filter": {"Key": {"FilterRules": [
                       {"Name": "Prefix", "Value": "images/"}]}}}
    stored = {"LambdaFunctionConfigurations": [lambda_conf], "EventBridgeConfiguration": {}}
    desired = kn.desired_configuration("fleetkeeper-keys", ARN, kn.EVENTS, "keys/")
    new, before, _after = kn.plan_bucket(stored, desired, "fleetkeeper-keys")
    assert before is None
    assert new == {"LambdaFunctionConfigurations": [lambda_conf], "EventBridgeConfiguration": {},
                   "QueueConfigurations": [desired]}


@pytest.mark.parametrize("other_filter, overlaps", [
    (None, True),
    ([{"Name": "prefix", "Value": "keys/admins/"}], True),
    ([{"Name": "prefix", "Value": "k"}], True),
    ([{"Name": "prefix", "Value": "images/"}], False),
    ([{"Name": "prefix", "Value": "keys/"}, {"Name": "suffix", "Value": ".jpg"}], True),
])
def test_overlap_follows_s3s_rules(other_filter, overlaps):
    other = {"Id": "theirs", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Events": ["s3:ObjectRemoved:Delete"]}
    if other_filter:
        other["Filter"] = {"Key": {"FilterRules": other_filter}}
    desired = kn.desired_configuration("fleetkeeper-keys", ARN, kn.EVENTS, "keys/")
    if overlaps:
        with pytest.raises(kn.NotificationError, match="'theirs'"):
            kn.plan_bucket({"TopicConfigurations": [other]}, desired, "fleetkeeper-keys")
    else:
        assert kn.plan_bucket({"TopicConfigurations": [other]}, desired, "fleetkeeper-keys")[0] is not None


def test_events_of_another_family_do_not_overlap():
    other = {"Id": "restore", "QueueArn": ARN, "Events": ["s3:ObjectRestore:Completed"]}
    desired = kn.desired_configuration("fleetkeeper-keys", ARN, kn.EVENTS, "keys/")
    assert kn.plan_bucket({"QueueConfigurations": [other]}, desired, "fleetkeeper-keys")[0] is not None


def test_policy_statement_replaced_by_sid_others_kept_and_removal():
    theirs = {"Sid": "Theirs", "Effect": "Allow", "Principal": "*", "Action": "sqs:GetQueueUrl", "Resource": ARN}
    statement = kn.policy_statement(ARN, "fleet-keys", None)
    new, before, after = kn.plan_policy(json.dumps({"Version": "2012-10-17", "Statement": theirs}), statement)
    assert before is None and after == statement
    assert json.loads(new)["Statement"] == [theirs, statement]
    assert kn.plan_policy(new, statement)[0] is None
    removed, before, _after = kn.plan_policy(new, None)
    assert before == statement and json.loads(removed)["Statement"] == [theirs]
    assert kn.plan_policy(json.dumps({"Statement": [statement]}), None)[0] == ""
    with pytest.raises(kn.NotificationError, match="not JSON"):
        kn.plan_policy("{", statement)


class FakeS3:
    def __init__(self, refusals):
        self.refusals = refusals
        self.puts = 0

    def put_bucket_notification_configuration(self, aws_retry, Bucket, NotificationConfiguration):  # noqa: N803
        self.puts += 1
        if self.refusals:
            self.refusals -= 1
            raise ClientError({"Error": {"Code": "InvalidArgument", "Message": "Unable to validate the following "
                                         "destination configurations"}}, "PutBucketNotificationConfiguration")


def test_destination_check_is_retried_until_the_policy_is_visible():
    slept = []
    s3 = FakeS3(refusals=2)
    setup = kn.NotificationSetup(s3, None, None, check_mode=False, sleep=slept.append)
    setup._put("fleet-keys", {})  # pylint: disable=protected-access
    assert s3.puts == 3 and slept == [1.0, 2.0]


def test_destination_check_gives_up_with_the_error():
    s3 = FakeS3(refusals=1000)
    setup = kn.NotificationSetup(s3, None, None, check_mode=False, sleep=lambda _s: None)
    with pytest.raises(kn.NotificationError, match="InvalidArgument") as caught:
        setup._put("fleet-keys", {})  # pylint: disable=protected-access
    assert caught.value.original is not None

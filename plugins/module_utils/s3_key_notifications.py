# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""S3 event notifications on the key prefix to an SQS queue: the logic behind ``s3_key_notifications``.

* Pure planning over the dictionaries botocore returns: :func:`desired_configuration`,
  :func:`normalise` (S3 returns filter rule names as ``Prefix``/``Suffix``, the API model spells them
  ``prefix``/``suffix``: compared without case), :func:`plan_bucket` (only the configuration with our
  Id changes; the bucket's other queue, topic, Lambda and EventBridge configurations are put back
  as they were; an overlap with another configuration, which S3 would refuse, is reported by name),
  :func:`plan_policy` (our statement, by Sid, in the queue's policy; other statements kept).
* :class:`NotificationSetup` reads, plans and (unless in check mode) writes: the queue (created when
  missing), its attributes and policy, then the bucket's notification configuration. S3 checks the
  destination when the configuration is put (it sends ``s3:TestEvent``) and refuses it with
  ``InvalidArgument: Unable to validate the following destination configurations`` until the new queue
  policy is visible; that error is retried for up to a minute.

Clients are boto3 clients wrapped by amazon.aws's ``AWSRetry`` (calls pass ``aws_retry=True``);
nothing here takes an AnsibleModule.
"""

from __future__ import annotations

import copy
import json
import time

try:
    import botocore.exceptions

    # An AWS answer with an error code; anything else (BotoCoreError: no answer) goes to the caller as it is.
    AWS_ANSWER_ERRORS = (botocore.exceptions.ClientError,)
except ImportError:  # AnsibleAWSModule reports the missing SDK
    AWS_ANSWER_ERRORS = ()

from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_code
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_message

EVENTS = ("s3:ObjectCreated:*", "s3:ObjectRemoved:*")
EVENT_CHOICES = ("s3:ObjectCreated:*", "s3:ObjectCreated:Put", "s3:ObjectCreated:Post", "s3:ObjectCreated:Copy",
                 "s3:ObjectCreated:CompleteMultipartUpload", "s3:ObjectRemoved:*", "s3:ObjectRemoved:Delete",
                 "s3:ObjectRemoved:DeleteMarkerCreated")
KINDS = ("QueueConfigurations", "TopicConfigurations", "LambdaFunctionConfigurations")
TARGETS = {"QueueConfigurations": "QueueArn", "TopicConfigurations": "TopicArn",
           "LambdaFunctionConfigurations": "LambdaFunctionArn"}
POLICY_SID = "FleetkeeperS3KeyEvents"
NO_QUEUE = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
VALIDATION_WAIT = 60  # seconds S3's destination check is retried after a policy change


class NotificationError(Exception):
    """The setup cannot be done as asked; ``original`` is botocore's error when an AWS call failed."""

    def __init__(self, message, original=None):
        super().__init__(message)
        self.original = original


def _rules(configuration: dict) -> dict:
    rules = (((configuration.get("Filter") or {}).get("Key") or {}).get("FilterRules")) or []
    return {str(r.get("Name", "")).lower(): r.get("Value", "") for r in rules if r.get("Value")}


def normalise(configuration: dict, kind: str = "QueueConfigurations") -> dict:
    """A configuration in one spelling: sorted events, lowercase filter rule names, no empty rule."""
    result = {"Id": configuration.get("Id"), TARGETS[kind]: configuration.get(TARGETS[kind]),
              "Events": sorted(configuration.get("Events") or [])}
    rules = _rules(configuration)
    if rules:
        result["Filter"] = {"Key": {"FilterRules": [{"Name": name, "Value": rules[name]} for name in sorted(rules)]}}
    return result


def desired_configuration(notification_id: str, queue_arn: str, events, prefix: str) -> dict:
    configuration = {"Id": notification_id, "QueueArn": queue_arn, "Events": sorted(set(events))}
    if prefix:
        configuration["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
    return configuration


def _events_overlap(one, other) -> bool:
    def family(event):
        return event.split(":")[1] if event.count(":") >= 2 else event

    for a in one:
        for b in other:
            if a == b or (family(a) == family(b) and (a.endswith(":*") or b.endswith(":*"))):
                return True
    return False


def _filters_overlap(one: dict, other: dict) -> bool:
    """S3's rule: two filters overlap when some key could match both (prefixes nest, suffixes nest)."""
    a, b = _rules(one), _rules(other)
    prefix_a, prefix_b = a.get("prefix", ""), b.get("prefix", "")
    suffix_a, suffix_b = a.get("suffix", ""), b.get("suffix", "")
    prefixes = prefix_a.startswith(prefix_b) or prefix_b.startswith(prefix_a)
    suffixes = suffix_a.endswith(suffix_b) or suffix_b.endswith(suffix_a)
    return prefixes and suffixes


def plan_bucket(current: dict, desired: dict | None, notification_id: str) -> tuple:
    """(new configuration to put, before, after) for the bucket; ``desired`` None removes ours.

    ``current`` is GetBucketNotificationConfiguration's response. ``before``/``after`` are our
    configuration normalised (None when absent). The new configuration is None when nothing changes.
    """
    new = {}
    before = None
    for kind in KINDS:
        for configuration in current.get(kind) or []:
            if configuration.get("Id") == notification_id:
                before = normalise(configuration, kind) if kind == "QueueConfigurations" else {"kind": kind}
                continue
            if desired is not None and _events_overlap(configuration.get("Events") or [], desired["Events"]) \
                    and _filters_overlap(configuration, desired):
                raise NotificationError(
                    f"the bucket's notification configuration {configuration.get('Id')!r} ({kind}) covers the same "
                    f"events and keys as {notification_id!r} would; S3 refuses overlapping configurations. Remove "
                    "it, or narrow its prefix or events")
            new.setdefault(kind, []).append({k: v for k, v in configuration.items() if k != "ResponseMetadata"})
    if "EventBridgeConfiguration" in current:
        new["EventBridgeConfiguration"] = current["EventBridgeConfiguration"]
    after = normalise(desired) if desired is not None else None
    if before == after:
        return None, before, after
    if desired is not None:
        new.setdefault("QueueConfigurations", []).append(copy.deepcopy(desired))
    return new, before, after


def policy_statement(queue_arn: str, bucket: str, source_account: str | None) -> dict:
    condition = {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"}}
    if source_account:
        condition["StringEquals"] = {"aws:SourceAccount": source_account}
    return {"Sid": POLICY_SID, "Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"},
            "Action": "sqs:SendMessage", "Resource": queue_arn, "Condition": condition}


def plan_policy(current_text: str | None, statement: dict | None) -> tuple:
    """(new policy text or None when unchanged, our statement before, after); ``statement`` None removes ours."""
    try:
        policy = json.loads(current_text) if current_text else {}
    except ValueError:
        raise NotificationError("the queue's policy is not JSON; fix or remove it first") from None
    statements = policy.get("Statement") or []
    if isinstance(statements, dict):
        statements = [statements]
    before = next((s for s in statements if isinstance(s, dict) and s.get("Sid") == POLICY_SID), None)
    if before == statement:
        return None, before, statement
    others = [s for s in statements if not (isinstance(s, dict) and s.get("Sid") == POLICY_SID)]
    if statement is not None:
        others.append(statement)
    if not others:
        return "", before, statement
    new = {"Version": policy.get("Version", "2012-10-17"), "Statement": others}
    if policy.get("Id"):
        new["Id"] = policy["Id"]
    return json.dumps(new, sort_keys=True), before, statement


class NotificationSetup:  # pylint: disable=too-many-instance-attributes
    """Queue, queue policy and bucket notification for one bucket and prefix."""

    def __init__(self, s3, sqs, sts, check_mode: bool, sleep=time.sleep):
        self.s3, self.sqs, self.sts = s3, sqs, sts
        self.check_mode = check_mode
        self.sleep = sleep
        self.changes = []

    def _call(self, action: str, function, **kwargs):
        try:
            return function(aws_retry=True, **kwargs)
        except AWS_ANSWER_ERRORS as exc:  # wrapped with their action
            raise NotificationError(f"{action} failed: {error_code(exc)}: {error_message(exc)}", exc) from None

    def queue(self, name: str, attributes: dict, create: bool = True) -> dict:
        """The queue's URL and ARN; created (``create``) or updated unless in check mode."""
        try:
            url = self.sqs.get_queue_url(aws_retry=True, QueueName=name)["QueueUrl"]
        except AWS_ANSWER_ERRORS as exc:
            if error_code(exc) not in NO_QUEUE:
                raise NotificationError(f"GetQueueUrl for {name} failed: {error_code(exc)}: {error_message(exc)}",
                                        exc) from None
            url = None
        if url is None and not create:
            return {"url": None, "arn": None, "attributes": {}, "new": False}
        if url is None:
            self.changes.append("queue")
            if self.check_mode:
                account = self._call("GetCallerIdentity", self.sts.get_caller_identity)["Account"]
                region = self.sqs.meta.region_name
                return {"url": None, "arn": f"arn:aws:sqs:{region}:{account}:{name}", "attributes": {}, "new": True}
            url = self._call("CreateQueue", self.sqs.create_queue, QueueName=name, Attributes=attributes)["QueueUrl"]
        current = self._call("GetQueueAttributes", self.sqs.get_queue_attributes, QueueUrl=url,
                             AttributeNames=["All"])["Attributes"]
        differing = {k: v for k, v in attributes.items() if current.get(k) != v}
        if differing:
            self.changes.append("queue attributes")
            if not self.check_mode:
                self._call("SetQueueAttributes", self.sqs.set_queue_attributes, QueueUrl=url, Attributes=differing)
        return {"url": url, "arn": current["QueueArn"], "attributes": current, "new": False}

    def policy(self, queue: dict, statement: dict | None) -> tuple:
        new, before, after = plan_policy(queue["attributes"].get("Policy"), statement)
        if new is not None:
            self.changes.append("queue policy")
            if not self.check_mode and queue["url"]:
                self._call("SetQueueAttributes", self.sqs.set_queue_attributes, QueueUrl=queue["url"],
                           Attributes={"Policy": new})
        return before, after

    def bucket(self, bucket: str, desired: dict | None, notification_id: str) -> tuple:
        current = self._call("GetBucketNotificationConfiguration", self.s3.get_bucket_notification_configuration,
                             Bucket=bucket)
        new, before, after = plan_bucket(current, desired, notification_id)
        if new is not None:
            self.changes.append("bucket notification")
            if not self.check_mode:
                self._put(bucket, new)
        return before, after

    def _put(self, bucket: str, configuration: dict) -> None:
        waited = 0.0
        delay = 1.0
        while True:
            try:
                self.s3.put_bucket_notification_configuration(aws_retry=True, Bucket=bucket,
                                                              NotificationConfiguration=configuration)
                return
            except AWS_ANSWER_ERRORS as exc:
                retry = error_code(exc) == "InvalidArgument" and "validate" in error_message(exc)
                if not retry or waited + delay > VALIDATION_WAIT:
                    raise NotificationError(f"PutBucketNotificationConfiguration on {bucket} failed: "
                                            f"{error_code(exc)}: {error_message(exc)}", exc) from None
                self.sleep(delay)
                waited += delay
                delay = min(delay * 2, 10.0)

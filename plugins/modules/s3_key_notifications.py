#!/usr/bin/python
# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: s3_key_notifications
version_added: 0.1.0
short_description: Send S3 events on the SSH key prefix to an SQS queue, for revocation in seconds
description:
  - Puts in place what the rulebook C(fleetkeeper.aws.keysync) (C(extensions/eda/rulebooks/keysync.yml)) reads,
    an SQS standard queue, a statement in its policy that lets S3 (this bucket only, optionally this account
    only) send to it, and an event notification on the bucket for O(events) on keys under O(prefix), target
    the queue.
  - Only the bucket's notification configuration with the Id O(notification_id) is managed; the bucket's other
    queue, topic, Lambda and EventBridge configurations are put back unchanged. A configuration of another Id
    that covers the same events and keys, which S3 would refuse, fails the task and names it.
  - Only the policy statement with the Sid C(FleetkeeperS3KeyEvents) is managed; other statements stay.
  - S3 checks the destination when the configuration is saved (it sends an C(s3:TestEvent), which the event
    source drops) and refuses it until a new queue policy has propagated; that refusal is retried for up to a
    minute.
  - O(state=absent) removes the bucket's notification configuration and the policy statement; the queue stays
    (remove it with M(community.aws.sqs_queue) when nothing else uses it).
  - Why not C(community.aws.s3_bucket_notification)? Checked with community.aws 11.2.0 - it sends the filter
    rule names as C(Prefix) and C(Suffix) and always a C(Suffix) rule, empty when no suffix is wanted (the API
    model spells them C(prefix)/C(suffix), and the test endpoint, moto, refuses both with an internal
    error); it compares the stored configuration with the wanted one as raw dictionaries, so any difference in
    spelling or order that S3 makes reports a change on every run; it has no diff; it reports AWS errors without
    their code; and it does not manage the queue's policy, without which S3 refuses the configuration. This
    module compares normalised configurations (filter names without case, sorted events, no empty rule), so a
    second run changes nothing, and does the queue and its policy in the same task.
author:
  - fleetkeeper maintainers (@fleetkeeper)
options:
  bucket:
    description: The key bucket (C(bastion_keys_bucket) of the role).
    type: str
    required: true
  prefix:
    description:
      - Key prefix the hosts sync (C(bastion_keys_prefix) of the role). Only keys under it cause events.
        An empty string covers the whole bucket.
    type: str
    default: keys/
  queue_name:
    description: Name of the SQS standard queue (created when missing). FIFO queues are not allowed as S3 targets.
    type: str
    required: true
  notification_id:
    description: Id of the bucket's notification configuration this module manages.
    type: str
    default: fleetkeeper-keys
  events:
    description: S3 event types that notify the queue.
    type: list
    elements: str
    choices: [s3:ObjectCreated:*, s3:ObjectCreated:Put, s3:ObjectCreated:Post, s3:ObjectCreated:Copy,
              s3:ObjectCreated:CompleteMultipartUpload, s3:ObjectRemoved:*, s3:ObjectRemoved:Delete,
              s3:ObjectRemoved:DeleteMarkerCreated]
    default: [s3:ObjectCreated:*, s3:ObjectRemoved:*]
  source_account:
    description:
      - Account that owns the bucket, added to the policy statement as C(aws:SourceAccount) (recommended by AWS
        against the confused deputy). Unset leaves the condition out.
    type: str
  visibility_timeout:
    description: Queue attribute C(VisibilityTimeout) in seconds (0 to 43200). Keep it above the source's coalescing window.
    type: int
    default: 60
  message_retention_period:
    description:
      - Queue attribute C(MessageRetentionPeriod) in seconds (60 to 1209600). Events older than the timer's interval
        are of no use (the timer's run has applied them), so the default is one hour.
    type: int
    default: 3600
  state:
    description: V(present) puts the queue, its policy statement and the notification; V(absent) removes the last two.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
attributes:
  check_mode:
    support: full
    description: Reports what would be created or changed without writing anything.
  diff_mode:
    support: full
    description: The queue's managed attributes, our policy statement and our notification configuration, before and after.
  idempotent:
    support: full
    description: A second run with the same arguments changes nothing.
notes:
  - Least-privilege policy for the credentials that run it in C(docs/iam/s3_key_notifications.json).
"""

EXAMPLES = r"""
- name: Send key file events to the queue the keysync rulebook reads
  fleetkeeper.aws.s3_key_notifications:
    bucket: example-bastion-keys
    prefix: keys/
    queue_name: fleetkeeper-keys
    source_account: "123456789012"

- name: Stop the events (the queue stays)
  fleetkeeper.aws.s3_key_notifications:
    bucket: example-bastion-keys
    queue_name: fleetkeeper-keys
    state: absent
"""

RETURN = r"""
queue_url:
  description: URL of the queue (null in check mode when it does not exist yet).
  returned: always
  type: str
queue_arn:
  description: ARN of the queue (in check mode for a queue to be created, the ARN it will have).
  returned: always
  type: str
notification:
  description: The managed notification configuration after the run, normalised (null after O(state=absent)).
  returned: always
  type: dict
changes:
  description: What changed (or would change) - C(queue), C(queue attributes), C(queue policy), C(bucket notification).
  returned: always
  type: list
  elements: str
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.fleetkeeper.aws.plugins.module_utils.s3_key_notifications import EVENT_CHOICES
from ansible_collections.fleetkeeper.aws.plugins.module_utils.s3_key_notifications import EVENTS
from ansible_collections.fleetkeeper.aws.plugins.module_utils.s3_key_notifications import NotificationError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.s3_key_notifications import NotificationSetup
from ansible_collections.fleetkeeper.aws.plugins.module_utils.s3_key_notifications import desired_configuration
from ansible_collections.fleetkeeper.aws.plugins.module_utils.s3_key_notifications import policy_statement


def argument_spec():
    return dict(
        bucket=dict(type="str", required=True),
        prefix=dict(type="str", default="keys/"),
        queue_name=dict(type="str", required=True),
        notification_id=dict(type="str", default="fleetkeeper-keys"),
        events=dict(type="list", elements="str", choices=list(EVENT_CHOICES), default=list(EVENTS)),
        source_account=dict(type="str"),
        visibility_timeout=dict(type="int", default=60),
        message_retention_period=dict(type="int", default=3600),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    )


def problems_of(params):
    """What is wrong with the parameters beyond their types and choices (empty: nothing)."""
    problems = []
    if params["queue_name"].endswith(".fifo"):
        problems.append("queue_name: S3 cannot notify FIFO queues")
    if not 0 <= params["visibility_timeout"] <= 43200:
        problems.append("visibility_timeout must be between 0 and 43200")
    if not 60 <= params["message_retention_period"] <= 1209600:
        problems.append("message_retention_period must be between 60 and 1209600")
    if not params["events"]:
        problems.append("events must name at least one event type")
    if params["source_account"] is not None and not (params["source_account"].isdigit()
                                                     and len(params["source_account"]) == 12):
        problems.append("source_account must be a 12-digit account id")
    return problems


def main():
    module = AnsibleAWSModule(argument_spec=argument_spec(), supports_check_mode=True)
    params = module.params
    problems = problems_of(params)
    if problems:
        module.fail_json(msg="; ".join(problems))

    retry = AWSRetry.jittered_backoff(retries=8, delay=1, max_delay=20)
    setup = NotificationSetup(module.client("s3", retry_decorator=retry), module.client("sqs", retry_decorator=retry),
                              module.client("sts", retry_decorator=retry), check_mode=module.check_mode)
    attributes = {"VisibilityTimeout": str(params["visibility_timeout"]),
                  "MessageRetentionPeriod": str(params["message_retention_period"])}
    present = params["state"] == "present"
    try:
        queue = setup.queue(params["queue_name"], attributes if present else {}, create=present)
        statement = policy_statement(queue["arn"], params["bucket"], params["source_account"]) if present else None
        if present:
            # The policy first: S3 checks the destination when the notification is saved.
            policy_before, policy_after = setup.policy(queue, statement)
            desired = desired_configuration(params["notification_id"], queue["arn"], params["events"], params["prefix"])
            notification_before, notification_after = setup.bucket(params["bucket"], desired, params["notification_id"])
        else:
            notification_before, notification_after = setup.bucket(params["bucket"], None, params["notification_id"])
            policy_before, policy_after = setup.policy(queue, None) if queue["url"] else (None, None)
    except NotificationError as exc:
        if exc.original is not None:
            module.fail_json_aws(exc.original, msg=str(exc))
        module.fail_json(msg=str(exc))

    managed = sorted(attributes)
    output = {"changed": bool(setup.changes), "changes": setup.changes, "queue_url": queue["url"],
              "queue_arn": queue["arn"], "notification": notification_after}
    if module._diff:
        before_attributes = {k: queue["attributes"].get(k) for k in managed} if not queue["new"] else None
        after_attributes = dict(before_attributes or {}, **attributes) if present else before_attributes
        output["diff"] = {
            "before": {"queue": before_attributes, "policy_statement": policy_before, "notification": notification_before},
            "after": {"queue": after_attributes, "policy_statement": policy_after, "notification": notification_after},
        }
    module.exit_json(**output)


if __name__ == "__main__":
    main()

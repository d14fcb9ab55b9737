# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rulebook fleetkeeper.aws.provision and its event source, run by the real ansible-rulebook.

Lifecycle notifications go into moto's SQS queue behind the fault proxy in every
format AWS delivers them (the hook's own message, the same through a real SNS
topic subscribed to the queue, EventBridge's event), with a test notification
and garbage beside them. ansible-rulebook (Java 17 Drools engine) runs the rulebook
from the installed collection; its action runs a recording playbook in place of
the provisioning playbook, so that each run of the action is counted.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from lab import fleet as fleet_support
from lab.ansiblerun import BIN_DIR, ansible_env
from lab.lifecycle import LAUNCHING

RULEBOOK = os.path.join(BIN_DIR, "ansible-rulebook")
# ansible-rulebook is in both requirements files and Java 17 in scripts/lib.sh's FK_DEBS: the test command
# installs both, so a missing one fails here instead of skipping. The compat stage runs the source under the
# oldest core too.
pytestmark = [pytest.mark.slow, pytest.mark.compat]


@pytest.fixture(autouse=True, scope="module")
def rulebook_installed():
    assert os.path.exists(RULEBOOK), f"{RULEBOOK} missing: ansible-rulebook is in requirements-test.txt and -compat.txt"
    assert shutil.which("java") or os.environ.get("JAVA_HOME"), \
        "ansible-rulebook needs a Java 17 runtime (openjdk-17-jre-headless, in scripts/lib.sh's FK_DEBS)"


RECORDER = """\
- name: Record the event (stands for fleetkeeper.aws.provision)
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Write what the rulebook handed over, one file per run
      ansible.builtin.copy:
        dest: "{record_dir}/{{{{ ansible_eda.event.meta.uuid }}}}.json"
        content: "{{{{ {{'instance_id': provision_instance_id, 'token': provision_token,
                      'hook': provision_hook_name, 'asg': ansible_eda.event.asg_lifecycle.asg_name,
                      'origin': ansible_eda.event.asg_lifecycle.origin,
                      'destination': ansible_eda.event.asg_lifecycle.destination,
                      'format': ansible_eda.event.asg_lifecycle.format}} | to_json }}}}"
        mode: "0600"
"""


def hook_message(instance_id, token, **extra):
    message = {
        "Origin": "EC2", "Destination": "AutoScalingGroup", "LifecycleHookName": "fleetkeeper-launch",
        "AccountId": "123456789012", "RequestId": str(uuid.uuid4()), "Service": "AWS Auto Scaling",
        "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING", "AutoScalingGroupName": "web",
        "Time": "2026-12-01T04:10:26.533Z", "EC2InstanceId": instance_id, "LifecycleActionToken": token,
    }
    message.update(extra)
    return message


def eventbridge_event(instance_id, token):
    fields = hook_message(instance_id, token)
    return {
        "version": "0", "id": str(uuid.uuid4()), "detail-type": "EC2 Instance-launch Lifecycle Action",
        "source": "aws.autoscaling", "account": "123456789012", "time": "2026-12-01T04:10:27Z",
        "region": "us-east-1", "resources": [],
        "detail": {k: fields[k] for k in ("LifecycleActionToken", "AutoScalingGroupName", "LifecycleHookName",
                                          "EC2InstanceId", "LifecycleTransition", "Origin", "Destination")},
    }


def queue_depth(sqs, url):
    attributes = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
    return sum(int(v) for v in attributes["Attributes"].values())


def records(record_dir):
    found = []
    for path in glob.glob(os.path.join(record_dir, "*.json")):
        with open(path, encoding="utf-8") as handle:
            found.append(json.load(handle))
    return found


class Rulebook:
    """ansible-rulebook running the collection's rulebook in its own process group."""

    def __init__(self, tmp_path, variables, inventory=None, env=None):
        self.log_path = tmp_path / "ansible-rulebook.log"
        vars_path = tmp_path / "vars.json"
        vars_path.write_text(json.dumps(variables))
        if inventory is None:
            inventory = tmp_path / "localhost.ini"
            inventory.write_text(f"localhost ansible_connection=local ansible_python_interpreter={BIN_DIR}/python\n")
        env = ansible_env(env)
        env.pop("ANSIBLE_STDOUT_CALLBACK")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(  # pylint: disable=consider-using-with
                [RULEBOOK, "-r", "fleetkeeper.aws.provision", "-i", str(inventory), "--vars", str(vars_path), "-v"],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # ansible-rulebook may exit before what it started (a playbook run, the source's poller): end the
        # rest of its process group too, so no call of theirs reaches the endpoint during the next test.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate, rulebook, timeout=150.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert rulebook.process.poll() is None, f"ansible-rulebook exited:\n{rulebook.log()[-4000:]}"
        time.sleep(0.5)
    raise AssertionError(f"timed out; ansible-rulebook log:\n{rulebook.log()[-4000:]}")


def test_rulebook_runs_the_action_once_per_lifecycle_action_and_empties_the_queue(aws, tmp_path):
    sqs, sns = aws.client("sqs"), aws.client("sns")
    url = sqs.create_queue(QueueName="fleet-lifecycle", Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    topic = sns.create_topic(Name="fleet-lifecycle")["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)

    actions = {f"i-{n:017x}": str(uuid.uuid4()) for n in (0xA1, 0xB2, 0xC3)}
    (direct, through_sns, eventbridge) = actions
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(
        {"AccountId": "123456789012", "AutoScalingGroupName": "web", "Service": "AWS Auto Scaling",
         "Event": "autoscaling:TEST_NOTIFICATION", "Time": "2026-12-01T04:09:00.000Z"}))
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(hook_message(direct, actions[direct])))
    sns.publish(TopicArn=topic, Message=json.dumps(hook_message(through_sns, actions[through_sns])),
                Subject="Auto Scaling: Lifecycle action 'LAUNCHING'")
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(eventbridge_event(eventbridge, actions[eventbridge])))
    sqs.send_message(QueueUrl=url, MessageBody="<html>not a notification</html>")
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(hook_message("all", str(uuid.uuid4()))))
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(
        hook_message("i-00000000000000dd4", str(uuid.uuid4()), LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING")))
    assert queue_depth(sqs, url) == 7
    # The source must ride out AWS errors: the first two receives are denied (botocore does not retry those).
    aws.proxy.inject("deny", service="sqs", operation="ReceiveMessage", times=2)

    record_dir = tmp_path / "records"
    record_dir.mkdir()
    playbook = tmp_path / "record.yml"
    playbook.write_text(RECORDER.format(record_dir=record_dir))
    rulebook = Rulebook(tmp_path, {
        "fleetkeeper_lifecycle_queue_url": url, "fleetkeeper_lifecycle_endpoint_url": aws.endpoint_url,
        "fleetkeeper_lifecycle_region": "us-east-1", "fleetkeeper_provision_playbook": str(playbook)})
    try:
        wait_for(lambda: len(records(record_dir)) >= 3 and queue_depth(sqs, url) == 0, rulebook)
        # Give a duplicate run the time to show up if there were one.
        time.sleep(5)
        log = rulebook.log()
    finally:
        rulebook.stop()

    runs = records(record_dir)
    assert sorted((r["instance_id"], r["token"]) for r in runs) == sorted(actions.items()), log
    assert {r["instance_id"]: r["format"] for r in runs} == {
        direct: "hook", through_sns: "sns", eventbridge: "eventbridge"}
    assert all((r["hook"], r["asg"], r["origin"], r["destination"]) ==
               ("fleetkeeper-launch", "web", "EC2", "AutoScalingGroup") for r in runs)
    assert queue_depth(sqs, url) == 0
    assert "deleted test notification" in log
    assert log.count("is not a lifecycle notification") == 2, log
    assert "ReceiveMessage failed" in log
    assert aws.proxy.count("sqs", "DeleteMessageBatch") >= 1
    assert "Traceback" not in log, log


def lifecycle_states(autoscaling, group="web"):
    found = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LifecycleState"] for i in found["Instances"]}


def test_rulebook_provisions_each_launched_instance_once_through_the_playbook(aws, tmp_path):
    """Scale-out -> the hook's notification -> rulebook -> fleetkeeper.aws.provision -> CONTINUE -> InService.

    The hook and its notifications are the test endpoint's lifecycle emulation; the inventory is the real
    fleet plugin reading Pending:Wait instances; the hosts standing for the instances run locally (their
    converge is one recording role). A redelivered notification (same token) completes nothing twice.
    """
    ec2, autoscaling, sqs = aws.client("ec2"), aws.client("autoscaling"), aws.client("sqs")
    fleet = fleet_support.create_network(ec2, "us-east-1")
    fleet_support.create_group(ec2, autoscaling, fleet, "web", 0)
    url = sqs.create_queue(QueueName="fleet-lifecycle")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    autoscaling.put_lifecycle_hook(
        AutoScalingGroupName="web", LifecycleHookName="fleetkeeper-provision", LifecycleTransition=LAUNCHING,
        HeartbeatTimeout=900, DefaultResult="ABANDON", NotificationTargetARN=arn,
        RoleARN="arn:aws:iam::123456789012:role/fleet-hooks")
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=2)
    pending = sorted(i for i, s in lifecycle_states(autoscaling).items() if s == "Pending:Wait")
    assert len(pending) == 2
    sqs.send_message(QueueUrl=url, MessageBody="garbage")
    assert queue_depth(sqs, url) == 4  # the hook's test notification, two launches, garbage

    marks = tmp_path / "marks"
    marks.mkdir()
    inventory = tmp_path / "inventory"
    inventory.mkdir()
    python = os.path.join(BIN_DIR, "python")
    (inventory / "pending.fleet.yml").write_text(json.dumps({
        "plugin": "fleetkeeper.aws.fleet", "regions": ["us-east-1"], "endpoint_url": aws.endpoint_url,
        "lifecycle_states": ["Pending:Wait"],
        "compose": {"ansible_connection": "'local'", "ansible_python_interpreter": f"'{python}'"}}))
    (inventory / "controller.yml").write_text(json.dumps({"all": {"hosts": {"localhost": {
        "ansible_connection": "local", "ansible_python_interpreter": python}}}}))
    # The playbook's settings and the roles' variables come from the --vars file, as docs/eda.md says: without
    # them reaching the playbook, the default roles (dns_cache) would run and the endpoint would be AWS's.
    rulebook = Rulebook(tmp_path, {
        "fleetkeeper_lifecycle_queue_url": url, "fleetkeeper_lifecycle_endpoint_url": aws.endpoint_url,
        "fleetkeeper_lifecycle_region": "us-east-1",
        "fleetkeeper_provision_extra_vars": {
            "provision_aws_endpoint_url": aws.endpoint_url, "eda_mark_dir": str(marks),
            "provision_roles": [{"name": "eda_mark", "become": False}], "provision_heartbeat_interval": 0}},
        inventory=inventory,
        env={"ANSIBLE_ROLES_PATH": os.path.join(os.path.dirname(__file__), "files", "provision_roles")})
    try:
        wait_for(lambda: set(lifecycle_states(autoscaling).values()) == {"InService"}
                 and queue_depth(sqs, url) == 0, rulebook, timeout=300)
        completions = list(aws.proxy.lifecycle.history)
        # SQS delivers again: the same notification (same token) for an instance already InService.
        [first] = [h for h in completions if h["EC2InstanceId"] == pending[0]]
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({
            "Origin": "EC2", "Destination": "AutoScalingGroup", "LifecycleHookName": first["LifecycleHookName"],
            "AccountId": "123456789012", "Service": "AWS Auto Scaling", "AutoScalingGroupName": "web",
            "LifecycleTransition": LAUNCHING, "EC2InstanceId": pending[0],
            "LifecycleActionToken": first["LifecycleActionToken"], "Time": "2026-12-01T04:30:00.000Z",
            "RequestId": str(uuid.uuid4())}))
        wait_for(lambda: rulebook.log().count("PLAY RECAP") >= 3 and queue_depth(sqs, url) == 0, rulebook,
                 timeout=180)
        log = rulebook.log()
    finally:
        rulebook.stop()
    assert sorted((h["EC2InstanceId"], h["Result"], h["How"]) for h in aws.proxy.lifecycle.history) == [
        (i, "CONTINUE", "CompleteLifecycleAction") for i in pending], log[-4000:]
    runs = [json.loads(p.read_text()) for p in marks.glob("*.json")]
    assert sorted(r["instance_id"] for r in runs) == pending, "each instance converged once"
    tokens = {h["EC2InstanceId"]: h["LifecycleActionToken"] for h in aws.proxy.lifecycle.history}
    assert all(r["token"] == tokens[r["instance_id"]] and r["hook"] == "fleetkeeper-provision" for r in runs)
    assert aws.proxy.count("autoscaling", "CompleteLifecycleAction") == 2
    assert aws.proxy.count("autoscaling", "RecordLifecycleActionHeartbeat") == 0, "provision_heartbeat_interval: 0"
    assert "deleted test notification" in log and "is not a lifecycle notification" in log
    assert "Traceback" not in log, log[-4000:]

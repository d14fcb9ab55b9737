# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Launch to InService through Event-Driven Ansible, on the embedded default.

    .venv/bin/python benchmarks/lifecycle/eda.py             # 5 rounds; root (a test host)
    .venv/bin/python benchmarks/lifecycle/eda.py --rounds 1 --no-write

The path measured, once per round: SetDesiredCapacity adds one instance to the
ASG "web" -> the launch hook (the test endpoint's lifecycle emulation, in front
of moto) holds it in Pending:Wait and sends its notification to an SQS queue ->
the event source fleetkeeper.aws.asg_lifecycle, in an ansible-rulebook that runs
the rulebook fleetkeeper.aws.provision throughout (as a real deployment keeps
it running; its start-up is not in the figures) -> run_playbook of
fleetkeeper.aws.provision with the instance id, token and hook -> the fleet
inventory (lifecycle_states: [Pending:Wait], no cache) finds the instance ->
wait for SSH, converge over SSH on one Debian 12 test host that stands for the
instance (its connection variables are composed onto the pending hosts) ->
CompleteLifecycleAction CONTINUE -> InService. The clock starts before
SetDesiredCapacity and stops when DescribeAutoScalingGroups (polled every
0.25 s) shows the instance InService.

The converge is one small role (tests/integration/files/provision_roles/lc_mark:
a file written on the host with become), so that the figure is the EDA path's
own cost; a real converge adds its roles' time (dns_cache's first converge on a
test host: about a minute, docs/development.md). Results go to
benchmarks/results/lifecycle_eda.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lab.hosts import launcher  # noqa: E402  pylint: disable=wrong-import-position
from lab.hosts import teardown  # noqa: E402  pylint: disable=wrong-import-position
from lab.hosts import state as runstate  # noqa: E402  pylint: disable=wrong-import-position
from lab import fleet as fleet_support  # noqa: E402  pylint: disable=wrong-import-position
from lab.ansiblerun import BIN_DIR, ansible_env  # noqa: E402  pylint: disable=wrong-import-position
from lab.awsemu import AwsEmulator  # noqa: E402  pylint: disable=wrong-import-position
from lab.lifecycle import LAUNCHING  # noqa: E402  pylint: disable=wrong-import-position

ROLES_PATH = os.path.join(ROOT, "tests", "integration", "files", "provision_roles")
PLATFORMS = [{"name": "instance", "networks": [{"name": "public"}]}]


def states(autoscaling):
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["web"])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LifecycleState"] for i in group["Instances"]}


def jinja_literal(value):
    """A compose expression that evaluates to ``value`` (JSON literals are Jinja literals, bar null)."""
    return json.dumps(value)


def write_inventory(directory, endpoint_url, host_vars):
    os.makedirs(directory, exist_ok=True)
    compose = {key: jinja_literal(value) for key, value in host_vars.items() if value is not None}
    compose.update({"provision_aws_endpoint_url": jinja_literal(endpoint_url),
                    "provision_roles": jinja_literal([{"name": "lc_mark"}])})
    with open(os.path.join(directory, "pending.fleet.yml"), "w", encoding="utf-8") as handle:
        json.dump({"plugin": "fleetkeeper.aws.fleet", "regions": ["us-east-1"], "endpoint_url": endpoint_url,
                   "lifecycle_states": ["Pending:Wait"], "compose": compose}, handle)
    with open(os.path.join(directory, "controller.yml"), "w", encoding="utf-8") as handle:
        json.dump({"all": {"hosts": {"localhost": {
            "ansible_connection": "local", "ansible_python_interpreter": os.path.join(BIN_DIR, "python"),
            "provision_aws_endpoint_url": endpoint_url}}}}, handle)


def start_rulebook(workdir, inventory, variables):
    with open(os.path.join(workdir, "vars.json"), "w", encoding="utf-8") as handle:
        json.dump(variables, handle)
    env = ansible_env({"ANSIBLE_ROLES_PATH": ROLES_PATH, "ANSIBLE_PIPELINING": "True"})
    env.pop("ANSIBLE_STDOUT_CALLBACK")
    log = open(os.path.join(workdir, "ansible-rulebook.log"), "wb")  # pylint: disable=consider-using-with
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [os.path.join(BIN_DIR, "ansible-rulebook"), "-r", "fleetkeeper.aws.provision", "-i", inventory,
         "--vars", os.path.join(workdir, "vars.json"), "-v"],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return process


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def one_launch(aws, autoscaling, capacity, timeout):
    before = set(states(autoscaling))
    started = time.monotonic()
    autoscaling.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=capacity)
    new = None
    pending_seen = None
    while time.monotonic() - started < timeout:
        now = states(autoscaling)
        fresh = [i for i in now if i not in before]
        if fresh:
            new = fresh[0]
            if now[new] == "Pending:Wait" and pending_seen is None:
                pending_seen = time.monotonic() - started
            if now[new] == "InService":
                total = time.monotonic() - started
                [done] = [h for h in aws.proxy.lifecycle.history if h["EC2InstanceId"] == new]
                seen = round(pending_seen, 2) if pending_seen is not None else None
                return {"instance_id": new, "launch_to_in_service_s": round(total, 2),
                        "pending_wait_seen_s": seen, "result": done["Result"], "how": done["How"],
                        "load_average": os.getloadavg()[0]}
        time.sleep(0.25)
    raise RuntimeError(f"instance {new} not InService within {timeout} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "lifecycle_eda.json"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (test hosts are systemd-nspawn containers in network namespaces)")
    started = time.time()
    owner = {**(runstate.process_identity(os.getpid()) or {}), "command": "test"}
    results = []
    with tempfile.TemporaryDirectory(prefix="fk-bench-eda-") as workdir, AwsEmulator() as aws:
        for key, value in aws.env().items():
            os.environ[key] = value
        ephemeral = os.path.join(workdir, "hosts")
        os.makedirs(os.path.join(ephemeral, "inventory"))
        host_started = time.monotonic()
        launcher.create(PLATFORMS, ephemeral, None, "bench-lifecycle-eda", owner=owner)
        host_seconds = round(time.monotonic() - host_started, 1)
        rulebook = None
        try:
            with open(os.path.join(ephemeral, "inventory", "testhosts_inventory.yml"), encoding="utf-8") as handle:
                host_vars = yaml.safe_load(handle)["all"]["hosts"]["instance"]
            ec2, autoscaling, sqs = aws.client("ec2"), aws.client("autoscaling"), aws.client("sqs")
            network = fleet_support.create_network(ec2, "us-east-1")
            fleet_support.create_group(ec2, autoscaling, network, "web", 0)
            autoscaling.update_auto_scaling_group(AutoScalingGroupName="web", MaxSize=args.rounds + 1)
            url = sqs.create_queue(QueueName="fleet-lifecycle")["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            autoscaling.put_lifecycle_hook(
                AutoScalingGroupName="web", LifecycleHookName="fleetkeeper-provision",
                LifecycleTransition=LAUNCHING, HeartbeatTimeout=900, DefaultResult="ABANDON",
                NotificationTargetARN=arn, RoleARN="arn:aws:iam::123456789012:role/fleet-hooks")
            inventory = os.path.join(workdir, "inventory")
            write_inventory(inventory, aws.endpoint_url, host_vars)
            rulebook = start_rulebook(workdir, inventory, {
                "fleetkeeper_lifecycle_queue_url": url, "fleetkeeper_lifecycle_endpoint_url": aws.endpoint_url,
                "fleetkeeper_lifecycle_region": "us-east-1"})
            # Ready when the source has read the hook's test notification off the queue.
            deadline = time.monotonic() + 180
            while "deleted test notification" not in open(os.path.join(workdir, "ansible-rulebook.log"),
                                                          encoding="utf-8", errors="replace").read():
                if rulebook.poll() is not None or time.monotonic() > deadline:
                    with open(os.path.join(workdir, "ansible-rulebook.log"), encoding="utf-8", errors="replace") as log:
                        raise RuntimeError(f"ansible-rulebook did not start:\n{log.read()[-3000:]}")
                time.sleep(0.5)
            for n in range(args.rounds):
                try:
                    figures = one_launch(aws, autoscaling, n + 1, args.timeout)
                except RuntimeError:
                    with open(os.path.join(workdir, "ansible-rulebook.log"), encoding="utf-8", errors="replace") as log:
                        print(log.read()[-6000:], file=sys.stderr)
                    raise
                figures["round"] = n + 1
                results.append(figures)
                print(json.dumps(figures), flush=True)
        finally:
            if rulebook is not None:
                stop(rulebook)
            teardown.destroy(ephemeral)
    totals = [r["launch_to_in_service_s"] for r in results]
    report = {
        "benchmark": "lifecycle_eda",
        "path": "SetDesiredCapacity -> Pending:Wait -> SQS notification -> ansible-rulebook (running) -> "
                "fleetkeeper.aws.provision (fleet inventory, SSH to one test host, role lc_mark) -> "
                "CompleteLifecycleAction CONTINUE -> InService",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg(),
                    "note": "2-core machine shared with other helpers' test runs (see load_average per round)"},
        "test_host_create_s": host_seconds,
        "duration_s": round(time.time() - started, 1),
        "results": results,
        "summary": {"rounds": len(totals), "median_s": round(statistics.median(totals), 2) if totals else None,
                    "range_s": [min(totals), max(totals)] if totals else None,
                    "results": sorted({r["result"] for r in results})},
    }
    print(json.dumps(report["summary"], indent=2))
    if not args.no_write:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

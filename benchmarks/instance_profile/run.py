# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Benchmark: instance profile roll-out over Auto Scaling fleets.

Compares, on the same fleet layout on the embedded moto endpoint with latency
added to every API call by the fault proxy:

* the role ``fleetkeeper.aws.instance_profile`` (through the playbook
  ``fleetkeeper.aws.instance_profiles``): IAM role, inline policy, instance
  profile, launch template versions, and every InService instance associated;
  run once from nothing, then again (no change);
* a loop of ``amazon.aws.ec2_instance`` with ``iam_instance_profile`` over the
  same instances (what a user writes otherwise); run once, then again.

Each side gets a fresh fleet (moto reset, same layout: N instances in G groups);
the baseline's profile is created beforehand without latency (the baseline does
no IAM or launch template work at all, so the comparison favours it).
Measured: wall time of each ansible-playbook run, and API calls by operation as
the fault proxy counted them.

Usage (from the repository root, after ``source scripts/lib.sh && fk_setup``)::

    .venv/bin/python benchmarks/instance_profile/run.py                 # 500 instances, 20 groups, 50 ms
    .venv/bin/python benchmarks/instance_profile/run.py --instances 40 --groups 4   # a quick look
    .venv/bin/python benchmarks/instance_profile/run.py --baseline-instances 100    # baseline on a sample

``--baseline-instances N`` runs the ec2_instance loop over the first N instances
only and scales its time linearly (marked in the output as extrapolated).
Figures go to benchmarks/results/instance_profile.json (and .png when matplotlib
is installed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lab import fleet as fleet_support  # noqa: E402  pylint: disable=wrong-import-position
from lab import instance_profile as support  # noqa: E402  pylint: disable=wrong-import-position
from lab.ansiblerun import ansible_env  # noqa: E402  pylint: disable=wrong-import-position
from lab.awsemu import AwsEmulator  # noqa: E402  pylint: disable=wrong-import-position

TAG = "fleetkeeper:bench"
INLINE = {"Version": "2012-10-17",
          "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::bench/*"}]}


def seed(emulator, instances, groups):
    ec2, autoscaling = emulator.client("ec2"), emulator.client("autoscaling")
    fleet = fleet_support.create_network(ec2, "us-east-1")
    per_group, extra = divmod(instances, groups)
    for index in range(groups):
        size = per_group + (1 if index < extra else 0)
        # A /24 holds 251 instances: give every group a subnet of its own.
        fleet.private_subnet = ec2.create_subnet(VpcId=fleet.vpc_id, CidrBlock=f"10.42.{10 + index}.0/24",
                                                 AvailabilityZone="us-east-1b")["Subnet"]["SubnetId"]
        fleet_support.create_group(ec2, autoscaling, fleet, f"bench-{index:02d}", size, tags={TAG: "yes"})
    return [i for ids in fleet.groups.values() for i in ids]


def ansible_playbook(args, env, tmp, prefix=()):
    """One ansible-playbook run (``prefix``: e.g. taskset arguments): (seconds, changed results, json report)."""
    command = list(prefix) + [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i",
                              os.path.join(tmp, "inventory")] + args
    environment = ansible_env(env)
    start = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU of the run and all its processes (ansible-playbook, forks, modules): what load cannot inflate.
    ansible_playbook.cpu_seconds = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2)
    if proc.returncode != 0:
        raise SystemExit(f"ansible-playbook failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    changed = sum(1 for play in report["plays"] for task in play["tasks"]
                  for host in task["hosts"].values()
                  for result in (host.get("results") or [host]) if result.get("changed"))
    return elapsed, changed, report


def task_durations(report):
    """{task name: seconds} from the json callback (where the time of a run goes)."""
    durations = {}
    for play in report["plays"]:
        for task in play["tasks"]:
            span = task["task"].get("duration") or {}
            if span.get("start") and span.get("end"):
                start = datetime.datetime.fromisoformat(span["start"].replace("Z", "+00:00"))
                end = datetime.datetime.fromisoformat(span["end"].replace("Z", "+00:00"))
                name = task["task"]["name"].split(" : ", 1)[-1]
                durations[name] = round(durations.get(name, 0) + (end - start).total_seconds(), 2)
    return durations


def measure(emulator, label, args, tmp, prefix=()):
    emulator.proxy.state.calls.clear()
    elapsed, changed, report = ansible_playbook(args, emulator.env(), tmp, prefix)
    summary = emulator.proxy.summary()
    figures = {"label": label, "wall_seconds": round(elapsed, 2), "changed_results": changed,
               "api_calls": sum(summary.values()), "api_calls_by_operation": summary,
               "cpu_seconds": ansible_playbook.cpu_seconds,
               "task_seconds": task_durations(report)}
    print(f"{label:40s} {elapsed:8.2f} s  {figures['cpu_seconds']:7.2f} s CPU  {figures['api_calls']:6d} API calls  "
          f"changed={changed}", flush=True)
    return figures, report


def run_baseline(emulator, instance_ids, tmp):
    playbook = os.path.join(tmp, "baseline.yml")
    with open(playbook, "w", encoding="utf-8") as handle:
        json.dump([{
            "name": "Baseline: a loop of amazon.aws.ec2_instance",
            "hosts": "localhost",
            "gather_facts": False,
            "module_defaults": {"group/amazon.aws.aws": {"endpoint_url": emulator.endpoint_url,
                                                         "region": "us-east-1"}},
            "tasks": [{
                "name": "Attach the instance profile to each instance",
                "amazon.aws.ec2_instance": {"instance_ids": ["{{ item }}"], "iam_instance_profile": "bench-base",
                                            "state": "present", "wait": False},
                "loop": "{{ bench_instance_ids }}",
            }],
        }], handle)
    extra = os.path.join(tmp, "baseline-vars.json")
    with open(extra, "w", encoding="utf-8") as handle:
        json.dump({"bench_instance_ids": instance_ids}, handle)
    first = measure(emulator, "ec2_instance loop: first run", [playbook, "-e", "@" + extra], tmp)[0]
    again = measure(emulator, "ec2_instance loop: re-run (no change)", [playbook, "-e", "@" + extra], tmp)[0]
    return first, again


def run_role(emulator, tmp, concurrency):
    extra = os.path.join(tmp, "role-vars.json")
    with open(extra, "w", encoding="utf-8") as handle:
        json.dump({"instance_profile_name": "bench-app",
                   "instance_profile_inline_policies": {"read": INLINE},
                   "instance_profile_asg_tag_filters": {TAG: "yes"},
                   "instance_profile_max_concurrency": concurrency,
                   "instance_profile_aws_endpoint_url": emulator.endpoint_url,
                   "instance_profile_aws_region": "us-east-1"}, handle)
    args = ["fleetkeeper.aws.instance_profiles", "-e", "@" + extra]
    first, first_report = measure(emulator, "role instance_profile: first run", args, tmp)
    again = measure(emulator, "role instance_profile: re-run (no change)", args, tmp)[0]
    check = measure(emulator, "role instance_profile: --check (no change)", args + ["--check"], tmp)[0]
    rollout = [host for play in first_report["plays"] for task in play["tasks"] if "Roll the instance profile" in
               task["task"]["name"] for host in task["hosts"].values()]
    first["rollout_summary"] = rollout[0].get("summary") if rollout else None
    return first, again, check


def plot(results, path):
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    runs = [results["baseline"]["first"], results["baseline"]["rerun"], results["role"]["first"],
            results["role"]["rerun"]]
    labels = ["ec2_instance loop\nfirst run", "ec2_instance loop\nre-run", "role\nfirst run", "role\nre-run"]
    colours = ["#b0b0b0", "#d0d0d0", "#2a7ab0", "#7ab8e0"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [r["wall_seconds"] for r in runs], color=colours)
    left.set_yscale("log")
    left.set_ylabel("wall time, s (log)")
    right.bar(labels, [r["api_calls"] for r in runs], color=colours)
    right.set_yscale("log")
    right.set_ylabel("API calls (log)")
    params = results["parameters"]
    fig.suptitle(f"Instance profile roll-out: {params['instances']} instances in {params['groups']} ASGs, "
                 f"{params['latency_ms']:.0f} ms per API call (moto)")
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=10, help="instance_profile_max_concurrency")
    parser.add_argument("--baseline-instances", type=int, default=0,
                        help="run the ec2_instance loop over only this many instances and extrapolate")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "instance_profile.json"))
    args = parser.parse_args(argv)

    results = {"parameters": {"instances": args.instances, "groups": args.groups, "latency_ms": args.latency_ms,
                              "concurrency": args.concurrency, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())}}
    with tempfile.TemporaryDirectory(prefix="fk-bench-ip-") as tmp, AwsEmulator() as emulator:
        with open(os.path.join(tmp, "inventory"), "w", encoding="utf-8") as handle:
            handle.write(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")

        # Baseline on a fresh fleet.
        instance_ids = seed(emulator, args.instances, args.groups)
        support.create_profile(emulator.client("iam"), "bench-base")
        sample = instance_ids[:args.baseline_instances] if args.baseline_instances else instance_ids
        emulator.proxy.set_latency(args.latency_ms)
        first, again = run_baseline(emulator, sample, tmp)
        scale = len(instance_ids) / len(sample)
        for figures in (first, again):
            figures["instances_run"] = len(sample)
            if scale != 1:
                figures["measured_wall_seconds"] = figures["wall_seconds"]
                figures["wall_seconds"] = round(figures["wall_seconds"] * scale, 2)
                figures["measured_api_calls"] = figures["api_calls"]
                figures["api_calls"] = round(figures["api_calls"] * scale)
                figures["extrapolated"] = True
        profiles = support.profile_of_instances(emulator.client("ec2"), sample)
        first["instances_with_profile_after"] = sum(1 for v in profiles.values() if v)
        results["baseline"] = {"first": first, "rerun": again}

        # The role on a fresh fleet of the same layout.
        emulator.proxy.set_latency(0)
        emulator.reset()
        instance_ids = seed(emulator, args.instances, args.groups)
        emulator.proxy.set_latency(args.latency_ms)
        role_first, role_again, role_check = run_role(emulator, tmp, args.concurrency)
        emulator.proxy.set_latency(0)
        profiles = support.profile_of_instances(emulator.client("ec2"), instance_ids)
        role_first["instances_with_profile_after"] = sum(1 for v in profiles.values() if v)
        results["role"] = {"first": role_first, "rerun": role_again, "check": role_check}

    results["speedup_first_run"] = round(results["baseline"]["first"]["wall_seconds"] / role_first["wall_seconds"], 1)
    results["speedup_rerun"] = round(results["baseline"]["rerun"]["wall_seconds"] / role_again["wall_seconds"], 1)
    results["targets"] = {"at_least_10x_faster": results["speedup_first_run"] >= 10,
                          "rerun_under_10s": role_again["wall_seconds"] < 10}
    try:
        results["load_average"] = os.getloadavg()
    except OSError:
        pass
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
    print(json.dumps({k: results[k] for k in ("speedup_first_run", "speedup_rerun", "targets")}, indent=2))
    print(f"figures: {args.out}")
    plot(results, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

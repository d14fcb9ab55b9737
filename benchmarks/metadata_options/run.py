# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Benchmark: IMDSv2 (metadata options) roll-out over Auto Scaling fleets.

The instance profile roll-out benchmark's fleet, runner and counting (benchmarks/instance_profile/run.py),
for metadata options. On the embedded moto endpoint, with latency added to every API call by the
fault proxy, compares:

* ``fleetkeeper.aws.asg_metadata_options`` (one task, the groups by tag): launch template versions with
  ``MetadataOptions``, the CloudWatch ``MetadataNoToken`` read for every instance that still accepts
  IMDSv1, and ``ModifyInstanceMetadataOptions`` on every InService instance; then again (no change), and
  once with ``--check``;
* a loop of ``amazon.aws.ec2_instance`` with ``metadata_options`` over the same instances (what a user
  writes otherwise; it does no launch template work and reads no metric, so the comparison favours it);
  run once, then again. ``--baseline-instances N`` runs it over N instances and scales time and calls
  linearly (each loop item is an independent module run).

Method: moto and the proxy are pinned to one core and every ansible-playbook to the other (taskset);
each round starts both sides from a fresh fleet of the same layout, the side that goes first alternating
by round; ``--rounds`` rounds (default 5); medians and ranges to
benchmarks/results/metadata_options.json.

    .venv/bin/python benchmarks/metadata_options/run.py --baseline-instances 20
    .venv/bin/python benchmarks/metadata_options/run.py --instances 40 --groups 4 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.instance_profile.run import TAG, measure, seed  # noqa: E402  pylint: disable=wrong-import-position
from lab import metadata_options as imds  # noqa: E402  pylint: disable=wrong-import-position
from lab.awsemu import AwsEmulator  # noqa: E402  pylint: disable=wrong-import-position

OPTIONS = {"http_tokens": "required", "http_put_response_hop_limit": 1}


def fresh_fleet(emulator, instances, groups):
    emulator.proxy.set_latency(0)
    emulator.reset()
    return seed(emulator, instances, groups)


def playbook(tmp, name, play):
    path = os.path.join(tmp, name)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump([play], handle)
    return path


def run_module_side(emulator, tmp, concurrency, prefix):
    path = playbook(tmp, "module.yml", {
        "name": "IMDSv2 on every fleet", "hosts": "localhost", "gather_facts": False,
        "module_defaults": {"group/fleetkeeper.aws.aws": {"endpoint_url": emulator.endpoint_url,
                                                          "region": "us-east-1"}},
        "tasks": [{"name": "Require IMDSv2", "fleetkeeper.aws.asg_metadata_options": {
            "tag_filters": {TAG: "yes"}, "metadata_options": OPTIONS, "max_concurrency": concurrency}}],
    })
    first = measure(emulator, "asg_metadata_options: first run", [path], tmp, prefix)[0]
    again = measure(emulator, "asg_metadata_options: re-run (no change)", [path], tmp, prefix)[0]
    check = measure(emulator, "asg_metadata_options: --check (no change)", [path, "--check"], tmp, prefix)[0]
    return first, again, check


def run_baseline(emulator, tmp, instance_ids, prefix):
    path = playbook(tmp, "baseline.yml", {
        "name": "Baseline: a loop of amazon.aws.ec2_instance", "hosts": "localhost", "gather_facts": False,
        "module_defaults": {"group/amazon.aws.aws": {"endpoint_url": emulator.endpoint_url, "region": "us-east-1"}},
        "tasks": [{"name": "Require IMDSv2 on each instance",
                   "amazon.aws.ec2_instance": {"instance_ids": ["{{ item }}"], "metadata_options": OPTIONS,
                                               "state": "present", "wait": False},
                   "loop": instance_ids}],
    })
    first = measure(emulator, "ec2_instance loop: first run", [path], tmp, prefix)[0]
    again = measure(emulator, "ec2_instance loop: re-run (no change)", [path], tmp, prefix)[0]
    return first, again


def required_count(emulator, instance_ids):
    options = imds.options_of_instances(emulator.client("ec2"), instance_ids)
    return sum(1 for o in options.values() if o["HttpTokens"] == "required")


def spread(values):
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-instances", type=int, default=0,
                        help="run the ec2_instance loop over only this many instances and extrapolate")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "metadata_options.json"))
    args = parser.parse_args(argv)

    os.sched_setaffinity(0, {args.server_core})  # moto and the proxy (started below) inherit it
    prefix = ["taskset", "-c", str(args.client_core)]
    rounds = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fk-bench-imds-") as tmp, AwsEmulator() as emulator:
        with open(os.path.join(tmp, "inventory"), "w", encoding="utf-8") as handle:
            handle.write(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
        for n in range(args.rounds):
            row = {"round": n, "order": ["module", "baseline"] if n % 2 == 0 else ["baseline", "module"]}
            for side in row["order"]:
                instance_ids = fresh_fleet(emulator, args.instances, args.groups)
                emulator.proxy.set_latency(args.latency_ms)
                if side == "module":
                    first, again, check = run_module_side(emulator, tmp, args.concurrency, prefix)
                    emulator.proxy.set_latency(0)
                    first["instances_required_after"] = required_count(emulator, instance_ids)
                    row["module"] = {"first": first, "rerun": again, "check": check}
                else:
                    sample = instance_ids[:args.baseline_instances] if args.baseline_instances else instance_ids
                    first, again = run_baseline(emulator, tmp, sample, prefix)
                    emulator.proxy.set_latency(0)
                    first["instances_required_after"] = required_count(emulator, sample)
                    scale = len(instance_ids) / len(sample)
                    for figures in (first, again):
                        figures["instances_run"] = len(sample)
                        if scale != 1:
                            figures["measured_wall_seconds"] = figures["wall_seconds"]
                            figures["wall_seconds"] = round(figures["wall_seconds"] * scale, 2)
                            figures["measured_api_calls"] = figures["api_calls"]
                            figures["api_calls"] = round(figures["api_calls"] * scale)
                            figures["extrapolated"] = True
                    row["baseline"] = {"first": first, "rerun": again}
            row["load_average"] = os.getloadavg()
            rounds.append(row)

    def pick(side, run, key="wall_seconds"):
        return [r[side][run][key] for r in rounds]

    speedups_first = [r["baseline"]["first"]["wall_seconds"] / r["module"]["first"]["wall_seconds"] for r in rounds]
    speedups_rerun = [r["baseline"]["rerun"]["wall_seconds"] / r["module"]["rerun"]["wall_seconds"] for r in rounds]
    summary = {
        "module_first_s": spread(pick("module", "first")),
        "module_rerun_s": spread(pick("module", "rerun")),
        "module_check_s": spread(pick("module", "check")),
        "baseline_first_s": spread(pick("baseline", "first")),
        "baseline_rerun_s": spread(pick("baseline", "rerun")),
        "module_first_api_calls": spread(pick("module", "first", "api_calls")),
        "module_rerun_api_calls": spread(pick("module", "rerun", "api_calls")),
        "baseline_first_api_calls": spread(pick("baseline", "first", "api_calls")),
        "baseline_rerun_api_calls": spread(pick("baseline", "rerun", "api_calls")),
        "speedup_first_run": spread(speedups_first),
        "speedup_rerun": spread(speedups_rerun),
    }
    results = {
        "parameters": {"instances": args.instances, "groups": args.groups, "latency_ms": args.latency_ms,
                       "concurrency": args.concurrency, "rounds": args.rounds,
                       "baseline_instances": args.baseline_instances or args.instances,
                       "pinning": {"moto_and_proxy_core": args.server_core, "ansible_core": args.client_core},
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))},
        "conditions": "2-core machine shared with other engineers' test runs (load_average per round)",
        "duration_s": round(time.time() - started, 1),
        "summary": summary,
        "targets": {"at_least_10x_faster": min(speedups_first) >= 10,
                    "rerun_under_10s": max(pick("module", "rerun")) < 10},
        "rounds": rounds,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
    print(json.dumps({"summary": summary, "targets": results["targets"]}, indent=2))
    print(f"figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

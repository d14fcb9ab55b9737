# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How many pending instances one controller converges at once with fleetkeeper.aws.provision.

For each size N (default 1, 5, 12, 20): boot a bastion and N private test hosts
(fresh root file systems, so every converge is a first install), scale an ASG
with a launch hook out by N on the embedded endpoint (N instances in
Pending:Wait), map the N test hosts onto the N pending instances, and run
``ansible-playbook fleetkeeper.aws.provision`` with ``forks = N + 1`` (every host
at once, plus localhost) through the bastion, with the real dns_cache role
(``--role dns_cache``) or a marker file only (``--role mark``: what is left is the
controller's own work per host: SSH through the bastion, facts, the lifecycle
calls). With ``--slow-seconds S`` (default 60) the first host of each run also
sleeps S seconds (the lc_slow role of the tests), the deliberately slow host.

Measured per host: from the scale-out (the launch) to its own
CompleteLifecycleAction (its InService), as the endpoint received it; per run:
the first and last host, the spread between them, whether every other host was
InService before the slow one, and the playbook's wall time; host boot is not
counted. The summary states the controller's overhead per additional host: the
slope of the median fast host's launch-to-InService over N (least squares over
the sizes' medians). Run as root on the test-host machine::

    .venv/bin/python benchmarks/lifecycle/run.py [--sizes 1 5 12 20] [--rounds 1] [--role mark]

Results: benchmarks/results/lifecycle.json (or --output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import yaml  # noqa: E402

from lab.hosts import launcher  # noqa: E402
from lab.hosts import teardown  # noqa: E402  pylint: disable=wrong-import-position
from lab.hosts import state as runstate  # noqa: E402
from lab import fleet as fleet_support  # noqa: E402
from lab.ansiblerun import BIN_DIR, ansible_env  # noqa: E402
from lab.awsemu import AwsEmulator  # noqa: E402
from lab.lifecycle import LAUNCHING  # noqa: E402

OWNER = {**(runstate.process_identity(os.getpid()) or {}), "command": "test"}


def platforms(count):
    hosts = [{"name": "bastion", "networks": [{"name": "public", "address": "10.213.0.10"},
                                              {"name": "private", "address": "10.0.63.10"}]}]
    for index in range(count):
        hosts.append({"name": f"pending{index:02d}", "proxy_jump": "bastion",
                      "networks": [{"name": "private", "address": f"10.0.63.{20 + index}"}]})
    return hosts


ROLES_PATH = os.path.join(REPO, "tests", "integration", "files", "provision_roles")


def roles_for(role, slow_seconds):
    roles = [{"name": "fleetkeeper.aws.dns_cache"}] if role == "dns_cache" else [{"name": "lc_mark"}]
    if slow_seconds:
        roles.append({"name": "lc_slow", "groups": ["bench_slow"]})
    return roles


def one_round(emulator, count, workdir, role="dns_cache", slow_seconds=0):
    ephemeral = os.path.join(workdir, f"run-{count}-{time.time_ns()}")
    os.makedirs(os.path.join(ephemeral, "inventory"))
    boot = time.monotonic()
    variables = launcher.create(platforms(count), ephemeral, None, "bench-lifecycle", owner=OWNER)
    boot = time.monotonic() - boot
    try:
        hosts = yaml.safe_load(open(os.path.join(ephemeral, "inventory", "testhosts_inventory.yml"),
                                    encoding="utf-8"))["all"]["hosts"]
        emulator.reset()
        ec2, autoscaling = emulator.client("ec2"), emulator.client("autoscaling")
        fleet = fleet_support.create_network(ec2, "us-east-1")
        fleet_support.create_group(ec2, autoscaling, fleet, "web", 0)
        autoscaling.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="fleetkeeper-provision",
                                       LifecycleTransition=LAUNCHING, HeartbeatTimeout=900, DefaultResult="ABANDON")
        launched = time.time()
        autoscaling.update_auto_scaling_group(AutoScalingGroupName="web", MaxSize=count, DesiredCapacity=count)
        pending = sorted(a["EC2InstanceId"] for a in emulator.proxy.lifecycle.actions())
        assert len(pending) == count, pending
        group = {}
        for index, instance_id in enumerate(pending):
            name = f"pending{index:02d}"
            host = dict(hosts[name])
            host.update({"instance_id": instance_id, "asg_name": "web", "region": "us-east-1",
                         "lifecycle_state": "Pending:Wait", "lifecycle_hook_name": "fleetkeeper-provision",
                         "dns_cache_upstreams": [{"address": variables["testhosts_hosts"][name]["resolver"]}]})
            group[name] = host
        inventory = os.path.join(ephemeral, "pending.yml")
        slow_host = "pending00" if slow_seconds and count > 1 else None
        with open(inventory, "w", encoding="utf-8") as handle:
            yaml.safe_dump({"all": {"children": {
                "lifecycle_pending_wait": {"hosts": group},
                "bench_slow": {"hosts": {slow_host: None} if slow_host else {}}}}}, handle)
        extra = {"provision_aws_endpoint_url": emulator.endpoint_url, "provision_heartbeat_interval": 60,
                 "provision_roles": roles_for(role, slow_seconds), "lc_slow_seconds": slow_seconds}
        env = ansible_env({"ANSIBLE_FORKS": str(count + 1), "ANSIBLE_PIPELINING": "True",
                           "ANSIBLE_ROLES_PATH": ROLES_PATH,
                           "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default", **emulator.env()})
        start_wall = time.time()
        start = time.monotonic()
        proc = subprocess.run([os.path.join(BIN_DIR, "ansible-playbook"), "-i", inventory,
                               "fleetkeeper.aws.provision", "-e", json.dumps(extra)],
                              env=env, capture_output=True, text=True, check=False, timeout=3600)
        wall = time.monotonic() - start
        history = emulator.proxy.lifecycle.history
        results = sorted(h["Result"] for h in history)
        last = max((h["At"] for h in history), default=start_wall)
        if proc.returncode != 0 or results != ["CONTINUE"] * count:
            raise RuntimeError(f"round with {count} failed (rc {proc.returncode}, results {results}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
        done = {h["EC2InstanceId"]: round(h["At"] - launched, 1) for h in history}
        slow_id = pending[0] if slow_host else None
        fast = sorted(t for i, t in done.items() if i != slow_id)
        return {"instances": count, "forks": count + 1, "role": role, "slow_seconds": slow_seconds,
                "to_all_completed_s": round(last - start_wall, 1),
                "launch_to_inservice_s": [done[i] for i in pending],
                "slow_host_s": done.get(slow_id), "fast_hosts_median_s": statistics.median(fast) if fast else None,
                "first_s": min(done.values()), "last_s": max(done.values()),
                "spread_s": round(max(done.values()) - min(done.values()), 1),
                "fast_hosts_before_slow": all(t < done[slow_id] for t in fast) if slow_id else None,
                "playbook_wall_s": round(wall, 1), "host_boot_s": round(boot, 1),
                "load_average_before": os.getloadavg()[0]}
    finally:
        teardown.destroy(ephemeral)


def median_of(results, key):
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def range_of(results, key):
    values = [r[key] for r in results if r.get(key) is not None]
    return [min(values), max(values)] if values else None


def overhead_per_host(summary):
    """Least-squares slope (s per host) of the median fast host's launch-to-InService over the sizes."""
    points = [(s["instances"], s["fast_hosts_median_s"]) for s in summary if s.get("fast_hosts_median_s") is not None]
    if len(points) < 2:
        return None
    mean_x = statistics.mean(x for x, _y in points)
    mean_y = statistics.mean(y for _x, y in points)
    spread = sum((x - mean_x) ** 2 for x, _y in points)
    return round(sum((x - mean_x) * (y - mean_y) for x, y in points) / spread, 2) if spread else None


def summarise(rounds):
    """Per size: medians and ranges over the rounds (``rounds``: {size: [one_round() results]})."""
    summary = []
    for size, results in rounds.items():
        times = [r["to_all_completed_s"] for r in results]
        with_slow = [r for r in results if r.get("fast_hosts_before_slow") is not None]
        summary.append({
            "instances": size, "forks": size + 1, "rounds": len(results),
            "to_all_completed_s_median": statistics.median(times), "to_all_completed_s_range": [min(times), max(times)],
            "per_instance_s_median": round(statistics.median(times) / size, 2),
            "playbook_wall_s_median": statistics.median(r["playbook_wall_s"] for r in results),
            "host_boot_s_median": statistics.median(r["host_boot_s"] for r in results),
            "load_average_before": [r["load_average_before"] for r in results],
            "fast_hosts_median_s": median_of(results, "fast_hosts_median_s"),
            "fast_hosts_range_s": range_of(results, "fast_hosts_median_s"),
            "slow_host_s_median": median_of(results, "slow_host_s"),
            "spread_s_median": median_of(results, "spread_s"), "spread_s_range": range_of(results, "spread_s"),
            "fast_hosts_before_slow": all(r["fast_hosts_before_slow"] for r in with_slow) if with_slow else None,
        })
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 12, 20])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--role", choices=["dns_cache", "mark"], default="dns_cache")
    parser.add_argument("--slow-seconds", type=int, default=60)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "lifecycle.json"))
    parser.add_argument("--from-log", help="summarise the per-round JSON lines an earlier run printed, run nothing")
    args = parser.parse_args(argv)
    os.environ.setdefault("ANSIBLE_COLLECTIONS_PATH", os.path.join(REPO, ".build", "collections"))
    rounds = {size: [] for size in args.sizes}
    if args.from_log:
        with open(args.from_log, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith('{"instances"'):
                    result = json.loads(line)
                    if result.get("slow_host_s") is None:
                        result["fast_hosts_before_slow"] = None  # no slow host (a run of one)
                    rounds.setdefault(result["instances"], []).append(result)
        rounds = {size: results for size, results in rounds.items() if results}
    with AwsEmulator() as emulator, tempfile.TemporaryDirectory(prefix="fk-bench-lifecycle-") as workdir:
        for round_index in range(0 if args.from_log else args.rounds):
            # Interleaved: each round visits every size, in alternating order.
            order = args.sizes if round_index % 2 == 0 else list(reversed(args.sizes))
            for size in order:
                result = one_round(emulator, size, workdir, args.role, args.slow_seconds)
                print(json.dumps(result), flush=True)
                rounds[size].append(result)
    summary = summarise(rounds)
    document = {
        "benchmark": "lifecycle: pending instances converged at once by fleetkeeper.aws.provision",
        "role": args.role, "slow_seconds": args.slow_seconds,
        "controller_overhead_per_additional_host_s": overhead_per_host(summary),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "note": "2 cores shared with other helpers' test suites (load average "
                    "recorded per round); wall times are pessimistic"},
        "method": "fresh test hosts per round, the role (dns_cache: first install of bind9 through the harness's "
                  "apt cache; mark: one file) through a bastion, one host sleeping slow_seconds more, forks = "
                  "instances + 1; per host, scale-out to its own CompleteLifecycleAction on moto behind the "
                  "lifecycle emulation",
        "results": summary,
        "rounds": rounds,
    }
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

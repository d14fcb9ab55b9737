# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Inventory benchmark: fleetkeeper.aws.fleet against amazon.aws.aws_ec2 on the same fleet, in one run.

    .venv/bin/python benchmarks/inventory/run.py                 # full run (20-40 minutes)
    .venv/bin/python benchmarks/inventory/run.py --sizes 1000 --regions 1 --no-write   # a quick look

Fleets: 1,000 instances in 20 ASGs on the moto server (behind the fault proxy),
and 10,000 / 50,000 instances in 200 / 1,000 ASGs served by the loopback
replay server (lab/replay.py: pages recorded from moto, filled in,
with the fields a real DescribeInstances answer carries), each in 1 region and
spread evenly over 4 regions. Every API call waits 50 ms (--latency-ms).

Plugins: ``fleetkeeper.aws.fleet`` with its defaults, and ``amazon.aws.aws_ec2``
selecting instances with ``filters: {tag-key: aws:autoscaling:groupName}`` and
grouping them with ``keyed_groups`` on ``ec2_tags['aws:autoscaling:groupName']``,
as users do today. Both use the jsonfile inventory cache.

Each measurement is one ``ansible-inventory -i FILE --graph`` child process
(building the inventory is what every ansible-playbook run pays; --graph adds
no per-variable output): wall time, user+system CPU and peak RSS of the child
(os.wait4 rusage), API calls counted by the proxy or the replay server, and the
number of hosts found. "cold" runs with an empty cache directory, "warm" right
after with the cache the cold run wrote.

Figures go to benchmarks/results/inventory.json and inventory.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lab import fleet as fl  # noqa: E402
from lab.ansiblerun import BIN_DIR, ansible_env  # noqa: E402
from lab.awsemu import TEST_CREDENTIALS, AwsEmulator  # noqa: E402
from lab.replay import ReplayServer  # noqa: E402

ONE_REGION = ["us-east-1"]
FOUR_REGIONS = ["eu-central-1", "eu-west-1", "ap-southeast-2", "us-west-2"]
SIZES = {1000: 20, 10000: 200, 20000: 400, 50000: 1000, 100000: 1000}
HOST_LINE = re.compile(r"^[ |]*\|--([^@].*)$")


def layout(instances, groups, regions):
    return {r: (instances // len(regions), groups // len(regions)) for r in regions}


def configs(endpoint, regions, cache_dir):
    cache = {"cache": True, "cache_plugin": "ansible.builtin.jsonfile", "cache_connection": cache_dir,
             "cache_timeout": 3600}
    fleet = {"plugin": "fleetkeeper.aws.fleet", "regions": regions, "endpoint_url": endpoint, **cache}
    aws_ec2 = {"plugin": "amazon.aws.aws_ec2", "regions": regions, "endpoint_url": endpoint,
               "filters": {"tag-key": "aws:autoscaling:groupName"},
               "keyed_groups": [{"key": "ec2_tags['aws:autoscaling:groupName']", "prefix": "asg"}], **cache}
    return {"fleet": ("bench.fleet.yml", fleet), "aws_ec2": ("bench.aws_ec2.yml", aws_ec2)}


def run_inventory(path, env):
    """One ansible-inventory child: (exit code, stdout, stderr, wall seconds, its own rusage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen([os.path.join(BIN_DIR, "ansible-inventory"), "-i", path, "--graph"], env=env,
                                stdout=out, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(), err.read().decode(), wall, usage


def measure(path, env, counter):
    before_calls = counter()
    code, stdout, stderr, wall, usage = run_inventory(path, env)
    hosts = {m.group(1).strip() for m in (HOST_LINE.match(line) for line in stdout.splitlines()) if m}
    if code != 0:
        raise RuntimeError(f"ansible-inventory -i {path} failed ({code}):\n{stderr[-3000:]}")
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "api_calls": counter() - before_calls,
        "hosts": len(hosts),
        "warnings": stderr.count("[WARNING]"),
    }


def build_moto_fleet(aws, regions, instances, groups):
    per_region_instances = instances // len(regions)
    per_region_groups = groups // len(regions)
    size = per_region_instances // per_region_groups
    for n, region in enumerate(regions):
        ec2, autoscaling = aws.client("ec2", region, direct=True), aws.client("autoscaling", region, direct=True)
        cidr = f"10.{50 + n}.0.0/16"  # a /20 subnet: 1,000 instances do not fit the helper's /24s
        vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.{50 + n}.16.0/20",
                                   AvailabilityZone=f"{region}a")["Subnet"]["SubnetId"]
        fleet = fl.Fleet(region=region, vpc_id=vpc, vpc_cidr=cidr, public_subnet=subnet, private_subnet=subnet)
        for g in range(per_region_groups):
            fl.create_group(ec2, autoscaling, fleet, f"fleet-{n}-{g:04d}", size)


def child_env():
    env = ansible_env(dict(TEST_CREDENTIALS))
    env.pop("ANSIBLE_STDOUT_CALLBACK", None)
    return env


def bench_case(name, endpoint, counter, regions, instances, groups, workdir, results, plugins):
    for plugin in plugins:
        cache_dir = tempfile.mkdtemp(prefix=f"cache-{plugin}-", dir=workdir)
        filename, config = configs(endpoint, regions, cache_dir)[plugin]
        path = os.path.join(workdir, f"{len(regions)}r-{instances}-{filename}")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        for phase in ("cold", "warm"):
            figures = measure(path, child_env(), counter)
            figures.update({
                "source": name, "plugin": plugin, "phase": phase, "instances": instances, "asgs": groups,
                "regions": len(regions),
                "cpu_ms_per_host": round(figures["cpu_s"] * 1000 / instances, 3),
                "call_budget": len(regions) * (math.ceil(instances / len(regions) / 1000)
                                               + math.ceil(groups / len(regions) / 100)) + len(regions),
            })
            results.append(figures)
            print(json.dumps(figures), flush=True)
        shutil.rmtree(cache_dir, ignore_errors=True)


def check_targets(results):
    def pick(plugin, phase, instances, regions):
        for r in results:
            if (r["plugin"], r["phase"], r["instances"], r["regions"]) == (plugin, phase, instances, regions):
                return r
        return None

    checks = []
    for regions, ratio in ((1, 0.5), (4, 1 / 3)):
        fleet, ec2 = pick("fleet", "cold", 10000, regions), pick("aws_ec2", "cold", 10000, regions)
        if fleet and ec2:
            checks.append({"target": f"10,000 instances, {regions} region(s): fleet wall <= {ratio:.2f} x aws_ec2",
                           "value": round(fleet["wall_s"] / ec2["wall_s"], 3), "met": fleet["wall_s"] <= ratio * ec2["wall_s"]})
    for r in results:
        if r["plugin"] == "fleet" and r["instances"] == 10000:
            if r["phase"] == "cold":
                checks.append({"target": f"10,000 / {r['regions']} region(s): CPU <= 0.5 ms per host",
                               "value": r["cpu_ms_per_host"], "met": r["cpu_ms_per_host"] <= 0.5})
            else:
                checks.append({"target": f"10,000 / {r['regions']} region(s): warm cache under 2 s",
                               "value": r["wall_s"], "met": r["wall_s"] < 2.0})
        if r["plugin"] == "fleet" and r["phase"] == "cold":
            checks.append({"target": f"{r['instances']} / {r['regions']} region(s): API calls <= budget "
                                     f"({r['call_budget']})", "value": r["api_calls"],
                           "met": r["api_calls"] <= r["call_budget"]})
    return checks


def plot(results, path):
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for regions, style in ((1, "-"), (4, "--")):
        for plugin, colour in (("fleet", "tab:green"), ("aws_ec2", "tab:red")):
            for phase, marker in (("cold", "o"), ("warm", "s")):
                rows = sorted((r for r in results if (r["plugin"], r["phase"], r["regions"]) == (plugin, phase, regions)),
                              key=lambda r: r["instances"])
                if not rows:
                    continue
                label = f"{plugin} {phase}, {regions} region{'s' if regions > 1 else ''}"
                xs = [r["instances"] for r in rows]
                axes[0].plot(xs, [r["wall_s"] for r in rows], style, marker=marker, color=colour, label=label)
                axes[1].plot(xs, [r["cpu_ms_per_host"] for r in rows], style, marker=marker, color=colour, label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="instances", ylabel="wall time (s)",
                title="ansible-inventory --graph, 50 ms per API call")
    axes[1].set(xscale="log", yscale="log", xlabel="instances", ylabel="client CPU per host (ms)",
                title="CPU of the ansible-inventory process / hosts")
    axes[1].axhline(0.5, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--regions", default="1,4")
    parser.add_argument("--plugins", default="fleet,aws_ec2")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "inventory.json"))
    parser.add_argument("--no-write", action="store_true", help="print figures only")
    parser.add_argument("--large-plugins", default=None,
                        help="plugins for fleets above 10,000 instances (default: --plugins)")
    parser.add_argument("--merge-log", default=None,
                        help="also report the result lines (one JSON object a line) an earlier run printed")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    region_sets = [ONE_REGION if n == "1" else FOUR_REGIONS for n in args.regions.split(",")]
    plugins = args.plugins.split(",")
    large_plugins = args.large_plugins.split(",") if args.large_plugins else plugins
    results = []
    if args.merge_log:
        with open(args.merge_log, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("{") and '"plugin"' in line:
                    results.append(json.loads(line))
    started = time.time()
    workdir = tempfile.mkdtemp(prefix="fk-bench-inventory-")
    try:
        for instances in sizes:
            groups = SIZES[instances]
            if instances <= 1000:
                with AwsEmulator() as aws:
                    for regions in region_sets:
                        build_moto_fleet(aws, regions, instances, groups)
                    aws.proxy.reset()
                    aws.proxy.set_latency(args.latency_ms)
                    for regions in region_sets:
                        bench_case("moto", aws.endpoint_url, aws.proxy.count, regions, instances, groups, workdir,
                                   results, plugins)
            else:
                for regions in region_sets:
                    with ReplayServer(layout(instances, groups, regions), latency_ms=args.latency_ms) as replay:
                        bench_case("replay", replay.endpoint_url, replay.total_calls, regions, instances, groups,
                                   workdir, results, plugins if instances <= 10000 else large_plugins)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "benchmark": "inventory",
        "command": "ansible-inventory -i FILE --graph",
        "latency_ms_per_call": args.latency_ms,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "duration_s": round(time.time() - started, 1),
        "merged_from": args.merge_log,
        "results": results,
        "targets": check_targets(results),
    }
    print(json.dumps(report["targets"], indent=2))
    if not args.no_write:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        plot(results, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

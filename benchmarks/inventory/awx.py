# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Inventory benchmark, AWX's way: fleetkeeper.aws.fleet against amazon.aws.aws_ec2 as an AWX inventory update.

    .venv/bin/python benchmarks/inventory/awx.py              # 5 interleaved rounds (about 9 minutes)
    .venv/bin/python benchmarks/inventory/awx.py --rounds 1 --no-write

AWX runs every inventory update as one command in its execution environment
(awx/main/tasks/jobs.py, RunInventoryUpdate.build_args), with no inventory cache
that survives the job, and then imports the JSON file:

    ansible-inventory --list --export -i SOURCE --output FILE --playbook-dir DIR -vvv

(-vvv is the inventory source's default verbosity 1) with
ANSIBLE_INVENTORY_UNPARSED_FAILED=True. This script runs exactly that, for both
plugins, on the same 10,000 instances in 200 ASGs (1 region) served by the
loopback replay server (lab/replay.py) with 50 ms per API call. The
plugin configurations are run.py's, without the cache options (AWX's update
starts from nothing each time). The rounds interleave the plugins, alternating
which goes first; the ansible-inventory child can run pinned to one core and this
process (with the replay server) to another when --pin is given (on a machine other jobs load,
pinning only confines the child to one core while they use both). Each result records wall time,
CPU and peak RSS of the child, API calls, hosts in the output file, its size,
and how many strings ansible-core wrapped as ``{"__ansible_unsafe": ...}``.

Figures go to benchmarks/results/inventory_awx.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as inventory_bench  # noqa: E402  pylint: disable=wrong-import-position

from lab.ansiblerun import BIN_DIR  # noqa: E402  pylint: disable=wrong-import-position
from lab.replay import ReplayServer  # noqa: E402  pylint: disable=wrong-import-position

CACHE_KEYS = ("cache", "cache_plugin", "cache_connection", "cache_timeout")


def awx_configs(endpoint, regions, workdir):
    """run.py's two inventory files, without the cache options, written to workdir."""
    paths = {}
    for plugin, (filename, config) in inventory_bench.configs(endpoint, regions, workdir).items():
        config = {k: v for k, v in config.items() if k not in CACHE_KEYS}
        path = os.path.join(workdir, filename)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        paths[plugin] = path
    return paths


def count_unsafe(value):
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return 1
        return sum(count_unsafe(v) for v in value.values())
    if isinstance(value, list):
        return sum(count_unsafe(v) for v in value)
    return 0


def pin(cpu):
    def apply():
        if hasattr(os, "sched_setaffinity") and cpu is not None:
            os.sched_setaffinity(0, {cpu})
    return apply


def awx_update(source, workdir, counter, cpu):
    """One AWX-style inventory update: figures of the ansible-inventory child."""
    output = os.path.join(workdir, "output.json")
    if os.path.exists(output):
        os.unlink(output)
    command = [os.path.join(BIN_DIR, "ansible-inventory"), "--list", "--export", "-i", source,
               "--output", output, "--playbook-dir", os.path.dirname(source), "-vvv"]
    env = inventory_bench.child_env()
    env["ANSIBLE_INVENTORY_UNPARSED_FAILED"] = "True"
    before = counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err,  # pylint: disable=consider-using-with
                                preexec_fn=pin(cpu))  # noqa: PLW1509 - sched_setaffinity only
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}):\n{stderr[-3000:]}")
    with open(output, encoding="utf-8") as handle:
        data = json.load(handle)
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "api_calls": counter() - before,
        "hosts": len(data.get("_meta", {}).get("hostvars", {})),
        "output_mb": round(os.path.getsize(output) / 1e6, 2),
        "unsafe_wrapped_values": count_unsafe(data),
        "warnings": stderr.count("[WARNING]"),
    }


def summarise(rows):
    walls = [r["wall_s"] for r in rows]
    cpus = [r["cpu_s"] for r in rows]
    return {"rounds": len(rows), "wall_s_median": round(statistics.median(walls), 3),
            "wall_s_range": [min(walls), max(walls)], "cpu_s_median": round(statistics.median(cpus), 3),
            "cpu_s_range": [min(cpus), max(cpus)], "api_calls": sorted({r["api_calls"] for r in rows}),
            "hosts": sorted({r["hosts"] for r in rows}), "output_mb": rows[0]["output_mb"],
            "unsafe_wrapped_values": rows[0]["unsafe_wrapped_values"]}


def build_report(args, plugins, groups, child_cpu, started, results):
    summary = {p: summarise([r for r in results if r["plugin"] == p]) for p in plugins}
    targets = []
    if {"fleet", "aws_ec2"} <= set(summary):
        ratio = summary["fleet"]["wall_s_median"] / summary["aws_ec2"]["wall_s_median"]
        targets.append({"target": f"{args.instances:,} instances, AWX command: fleet wall <= 0.1 x aws_ec2 (medians)",
                        "value": round(ratio, 4), "met": ratio <= 0.1})
    return {
        "benchmark": "inventory_awx",
        "command": "ansible-inventory --list --export -i SOURCE --output FILE --playbook-dir DIR -vvv",
        "environment": {"ANSIBLE_INVENTORY_UNPARSED_FAILED": "True"},
        "latency_ms_per_call": args.latency_ms,
        "instances": args.instances,
        "asgs": groups,
        "regions": 1,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "child_cpu": child_cpu,
                    "load_average_at_end": os.getloadavg(),
                    "note": "2-core machine shared with other helpers' test runs (see load_average per result); rounds interleaved"},
        "duration_s": round(time.time() - started, 1),
        "results": results,
        "summary": summary,
        "targets": targets,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--plugins", default="fleet,aws_ec2")
    parser.add_argument("--out", default=os.path.join(inventory_bench.ROOT, "benchmarks", "results", "inventory_awx.json"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--pin", action="store_true",
                        help="pin the ansible-inventory child to the last CPU and this process to the others "
                             "(useful on an idle machine; on a shared one it only confines the child)")
    args = parser.parse_args(argv)
    plugins = args.plugins.split(",")
    groups = inventory_bench.SIZES[args.instances]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    child_cpu = cpus[-1] if len(cpus) > 1 and args.pin else None
    if child_cpu is not None:
        os.sched_setaffinity(0, set(cpus[:-1]))
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="fk-bench-awx-") as workdir, \
            ReplayServer(inventory_bench.layout(args.instances, groups, inventory_bench.ONE_REGION),
                         latency_ms=args.latency_ms) as replay:
        sources = awx_configs(replay.endpoint_url, inventory_bench.ONE_REGION, workdir)
        for n in range(args.rounds):
            order = plugins if n % 2 == 0 else list(reversed(plugins))
            for plugin in order:
                figures = awx_update(sources[plugin], workdir, replay.total_calls, child_cpu)
                figures.update({"round": n + 1, "plugin": plugin, "instances": args.instances, "asgs": groups,
                                "load_average": os.getloadavg()[0]})
                results.append(figures)
                print(json.dumps(figures), flush=True)
            # Written after every round, so that an interrupted run keeps what it measured.
            report = build_report(args, plugins, groups, child_cpu, started, results)
            if not args.no_write:
                os.makedirs(os.path.dirname(args.out), exist_ok=True)
                with open(args.out, "w", encoding="utf-8") as handle:
                    json.dump(report, handle, indent=2)
    print(json.dumps({"summary": report["summary"], "targets": report["targets"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

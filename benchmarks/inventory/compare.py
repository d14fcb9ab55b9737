# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Inventory before/after: the fleet plugin at a git revision against the working tree, same fleet.

    .venv/bin/python benchmarks/inventory/compare.py --before REV          # 10,000 hosts, 5 rounds
    .venv/bin/python benchmarks/inventory/compare.py --before REV --instances 1000 --rounds 1 --no-write

What a change to the plugin costs: the revision ``--before`` is exported with ``git archive`` into a
temporary collection tree; the working tree is the "after". Both read the same replay fleet
(lab/replay.py, DescribeInstances items as a real answer carries them, metadataOptions
included) with 50 ms per call, through ``ansible-inventory -i FILE --graph`` child processes measured
as in run.py (wall, user+system CPU and peak RSS from wait4, API calls counted by the replay server).

Method: the replay server (this process) is pinned to one core and every ansible-inventory child to
another (taskset); the variants alternate within each round, the order swapping every round
(A B, B A, ...); each measurement is a cold run (empty cache) and the warm run after it; --rounds
rounds (default 5); medians and ranges. Figures go to benchmarks/results/inventory_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.inventory.run import HOST_LINE, child_env, configs, layout  # noqa: E402
from lab.ansiblerun import BIN_DIR  # noqa: E402
from lab.replay import ReplayServer  # noqa: E402


def export(revision, into):
    """The collection at ``revision`` as ansible_collections/fleetkeeper/aws under ``into``."""
    target = os.path.join(into, "ansible_collections", "fleetkeeper", "aws")
    os.makedirs(target)
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    return into


def run_pinned(core, path, env):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(["taskset", "-c", str(core), os.path.join(BIN_DIR, "ansible-inventory"), "-i", path,
                                 "--graph"], env=env, stdout=out, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)  # taskset execs the program: same process
        wall = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        stdout, stderr = out.read().decode(), err.read().decode()
    if code != 0:
        raise RuntimeError(f"ansible-inventory -i {path} failed ({code}):\n{stderr[-3000:]}")
    hosts = {m.group(1).strip() for m in (HOST_LINE.match(line) for line in stdout.splitlines()) if m}
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "hosts": len(hosts),
            "warnings": stderr.count("[WARNING]")}


def stats(values):
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' plugin")
    parser.add_argument("--name", default="compare", help="results file benchmarks/results/inventory_NAME.json")
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--child-core", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    os.sched_setaffinity(0, {args.server_core})
    work = tempfile.mkdtemp(prefix="fk-bench-compare-")
    started = time.time()
    rows = []
    try:
        before_root = export(args.before, os.path.join(work, "before"))
        variants = {"before": before_root, "after": None}  # None: the environment's own (the working tree)
        with ReplayServer(layout(args.instances, args.groups, ["us-east-1"]), latency_ms=args.latency_ms) as replay:
            for n in range(args.rounds):
                order = ["before", "after"] if n % 2 == 0 else ["after", "before"]
                for variant in order:
                    env = child_env()
                    if variants[variant]:
                        env["ANSIBLE_COLLECTIONS_PATH"] = variants[variant]
                    cache_dir = tempfile.mkdtemp(prefix="cache-", dir=work)
                    filename, config = configs(replay.endpoint_url, ["us-east-1"], cache_dir)["fleet"]
                    path = os.path.join(work, f"{variant}-{filename}")
                    with open(path, "w", encoding="utf-8") as handle:
                        json.dump(config, handle)
                    for phase in ("cold", "warm"):
                        calls = replay.total_calls()
                        figures = run_pinned(args.child_core, path, env)
                        figures.update({"round": n, "variant": variant, "phase": phase,
                                        "api_calls": replay.total_calls() - calls,
                                        "cpu_ms_per_host": round(figures["cpu_s"] * 1000 / args.instances, 3),
                                        "load_average": round(os.getloadavg()[0], 2)})
                        rows.append(figures)
                        print(json.dumps(figures), flush=True)
                    shutil.rmtree(cache_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for variant in ("before", "after"):
        for phase in ("cold", "warm"):
            picked = [r for r in rows if r["variant"] == variant and r["phase"] == phase]
            summary[f"{variant}_{phase}"] = {key: stats([r[key] for r in picked]) for key in
                                             ("wall_s", "cpu_s", "cpu_ms_per_host", "peak_rss_mb", "api_calls")}
            summary[f"{variant}_{phase}"]["hosts"] = sorted({r["hosts"] for r in picked})
    report = {
        "benchmark": "inventory before/after",
        "before": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", args.before], capture_output=True,
                                 text=True, check=True).stdout.strip(),
        "after": "working tree at " + subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                                     capture_output=True, text=True, check=True).stdout.strip(),
        "instances": args.instances, "asgs": args.groups, "regions": 1, "latency_ms_per_call": args.latency_ms,
        "rounds": args.rounds, "pinning": {"replay_server_core": args.server_core, "child_core": args.child_core},
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                    "note": "2-core machine shared with other engineers' test runs; see load_average per row"},
        "duration_s": round(time.time() - started, 1),
        "summary": summary,
        "rows": rows,
    }
    for key, value in summary.items():
        print(key, json.dumps({k: v["median"] if isinstance(v, dict) else v for k, v in value.items()}))
    if not args.no_write:
        out = os.path.join(ROOT, "benchmarks", "results", f"inventory_{args.name}.json")
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

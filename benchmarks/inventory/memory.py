# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where the memory of an AWX inventory update goes: the plugin, ansible-core's inventory, the export.

    PYTHONPATH=. .venv/bin/python benchmarks/inventory/memory.py --instances 100000 --rounds 5
    PYTHONPATH=. .venv/bin/python benchmarks/inventory/memory.py --instances 100000 \\
        --before /tmp/fk-before/collections     # also the collection as it was (ANSIBLE_COLLECTIONS_PATH)

Each round runs, for every collection variant (interleaved, alternating which goes first), against the
same replay server (lab/replay.py, 50 ms per call):

1. ``stages``: a Python child that builds ansible-core's InventoryManager from the ``fleet`` source as
   ``ansible-inventory`` does, with the plugin's ``_fetch``, ``_shape`` and ``_populate`` wrapped to read
   /proc/self/status: the resident set after the imports, the peak during the fetch (botocore's parsed
   pages and the records), the resident set after shaping (the hosts' variables, ours) and after
   populating (plus ansible-core's Host and Group objects). The peak is reset between stages
   (``echo 5 > /proc/self/clear_refs``).
2. ``export``: AWX's command, ``ansible-inventory --list --export --output FILE -vvv``, with its wall
   time, CPU, peak RSS (``wait4``) and output size (benchmarks/inventory/awx.py's ``awx_update``).

The export's share is its peak minus the resident set after populating. Figures go to
benchmarks/results/inventory_memory.json.
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

import awx  # noqa: E402  pylint: disable=wrong-import-position
import run as inventory_bench  # noqa: E402  pylint: disable=wrong-import-position

from lab.ansiblerun import BIN_DIR, COLLECTIONS_PATH  # noqa: E402  pylint: disable=wrong-import-position
from lab.replay import ReplayServer  # noqa: E402  pylint: disable=wrong-import-position

STAGES = r'''
import json, sys, time
def status():
    with open("/proc/self/status") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM")}
def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
from ansible.parsing.dataloader import DataLoader
from ansible.inventory.manager import InventoryManager
from ansible.plugins.loader import inventory_loader, init_plugin_loader
init_plugin_loader()
from ansible.utils.display import Display
Display().verbosity = 0
cls = inventory_loader.get("fleetkeeper.aws.fleet", class_only=True)
marks = {}
def wrap(name, before, after):
    original = getattr(cls, name)
    def wrapped(self, *args, **kwargs):
        reset_peak()
        marks[before] = status()
        value = original(self, *args, **kwargs)
        marks[after] = status()
        return value
    setattr(cls, name, wrapped)
wrap("_fetch", "before_fetch", "after_fetch")
wrap("_shape", "before_shape", "after_shape")
wrap("_populate", "before_populate", "after_populate")
marks["imports"] = status()
started = time.process_time()
manager = InventoryManager(loader=DataLoader(), sources=[sys.argv[1]])
marks["hosts"] = len(manager.hosts)
marks["cpu_s"] = round(time.process_time() - started, 3)
print(json.dumps(marks))
'''


def stages(source, collections, cpu):
    env = inventory_bench.child_env()
    env["ANSIBLE_COLLECTIONS_PATH"] = collections
    proc = subprocess.run([os.path.join(BIN_DIR, "python"), "-c", STAGES, source], env=env, capture_output=True,
                          text=True, check=False, preexec_fn=awx.pin(cpu))  # noqa: PLW1509 - sched_setaffinity only
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    base = marks["imports"]["VmRSS"]
    return {
        "rss_after_imports_mb": base,
        "fetch_peak_mb": marks["after_fetch"]["VmHWM"],
        "rss_after_fetch_mb": marks["after_fetch"]["VmRSS"],
        "rss_after_shape_mb": marks["after_shape"]["VmRSS"],
        "rss_after_populate_mb": marks["after_populate"]["VmRSS"],
        "plugin_peak_over_imports_mb": max(marks["after_fetch"]["VmHWM"], marks["after_shape"]["VmHWM"]) - base,
        "ansible_core_inventory_mb": marks["after_populate"]["VmRSS"] - marks["before_populate"]["VmRSS"],
        "stages_cpu_s": marks["cpu_s"],
        "hosts": marks["hosts"],
    }


def export(source, workdir, counter, collections, cpu):
    """awx.py's AWX-style update, with the child's ANSIBLE_COLLECTIONS_PATH set to ``collections``."""
    original = inventory_bench.child_env
    inventory_bench.child_env = lambda: dict(original(), ANSIBLE_COLLECTIONS_PATH=collections)
    try:
        return awx.awx_update(source, workdir, counter, cpu)
    finally:
        inventory_bench.child_env = original


def summarise(rows):
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and k not in ("round", "hosts")]
    out = {"rounds": len(rows)}
    for key in keys:
        values = [r[key] for r in rows]
        out[key] = {"median": round(statistics.median(values), 3), "range": [min(values), max(values)]}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--instances", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--before", help="ANSIBLE_COLLECTIONS_PATH holding the collection to compare with")
    parser.add_argument("--pin", action="store_true", help="pin the children to the last CPU")
    parser.add_argument("--out", default=os.path.join(inventory_bench.ROOT, "benchmarks", "results",
                                                      "inventory_memory.json"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--no-export", action="store_true", help="the stages only (the export takes longest)")
    parser.add_argument("--only", choices=["current", "before"], help="one variant only")
    args = parser.parse_args(argv)
    variants = {"current": COLLECTIONS_PATH}
    if args.before:
        variants["before"] = args.before
    if args.only:
        variants = {args.only: variants[args.only]}
    groups = inventory_bench.SIZES[args.instances]
    cpus = sorted(os.sched_getaffinity(0))
    child_cpu = cpus[-1] if len(cpus) > 1 and args.pin else None
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="fk-bench-mem-") as workdir, \
            ReplayServer(inventory_bench.layout(args.instances, groups, inventory_bench.ONE_REGION),
                         latency_ms=args.latency_ms) as replay:
        source = awx.awx_configs(replay.endpoint_url, inventory_bench.ONE_REGION, workdir)["fleet"]
        names = list(variants)
        for n in range(args.rounds):
            for name in (names if n % 2 == 0 else list(reversed(names))):
                row = {"round": n + 1, "variant": name, "instances": args.instances, "asgs": groups}
                row.update(stages(source, variants[name], child_cpu))
                if not args.no_export:
                    row.update({f"export_{k}": v for k, v in
                                export(source, workdir, replay.total_calls, variants[name], child_cpu).items()})
                    row["export_share_mb"] = round(row["export_peak_rss_mb"] - row["rss_after_populate_mb"], 1)
                row["load_average"] = os.getloadavg()[0]
                results.append(row)
                print(json.dumps(row), flush=True)
            report = {
                "benchmark": "inventory_memory",
                "command": "ansible-inventory --list --export -i SOURCE --output FILE --playbook-dir DIR -vvv",
                "latency_ms_per_call": args.latency_ms, "instances": args.instances, "asgs": groups,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "child_cpu": child_cpu,
                            "note": "2-core machine; load_average per result says how idle it was (above about "
                                    "1.5, wall times are upper bounds; CPU and memory hold either way)"},
                "variants": {name: variants[name] for name in names},
                "duration_s": round(time.time() - started, 1),
                "results": results,
                "summary": {name: summarise([r for r in results if r["variant"] == name]) for name in names},
            }
            if not args.no_write:
                with open(args.out, "w", encoding="utf-8") as handle:
                    json.dump(report, handle, indent=2)
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

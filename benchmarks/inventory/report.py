# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Print benchmarks/results/inventory.json as the Markdown tables of RESULTS.md.

    .venv/bin/python benchmarks/inventory/report.py [benchmarks/results/inventory.json]
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else os.path.join(ROOT, "benchmarks", "results", "inventory.json")
    with open(path, encoding="utf-8") as handle:
        report = json.load(handle)
    rows = report["results"]
    print("| instances / ASGs | regions | source | plugin | cache | wall s | CPU s | CPU ms/host | peak RSS MB | API calls (budget) | hosts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["instances"], r["regions"], r["plugin"] != "fleet", r["phase"])):
        budget = f" ({r['call_budget']})" if r["plugin"] == "fleet" and r["phase"] == "cold" else ""
        print(f"| {r['instances']:,} / {r['asgs']:,} | {r['regions']} | {r['source']} | {r['plugin']} | {r['phase']} "
              f"| {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['cpu_ms_per_host']:.2f} | {r['peak_rss_mb']:.0f} "
              f"| {r['api_calls']}{budget} | {r['hosts']:,} |")
    print()
    print("| ratio | value |")
    print("|---|---|")
    index = {(r["plugin"], r["phase"], r["instances"], r["regions"]): r for r in rows}
    for instances in sorted({r["instances"] for r in rows}):
        for regions in sorted({r["regions"] for r in rows}):
            for phase in ("cold", "warm"):
                fleet, ec2 = index.get(("fleet", phase, instances, regions)), index.get(("aws_ec2", phase, instances, regions))
                if fleet and ec2:
                    print(f"| {instances:,}, {regions} region(s), {phase}: wall fleet/aws_ec2 | {fleet['wall_s'] / ec2['wall_s']:.2f} |")
                    print(f"| {instances:,}, {regions} region(s), {phase}: CPU fleet/aws_ec2 | {fleet['cpu_s'] / ec2['cpu_s']:.2f} |")
    print()
    print("| target | measured | met |")
    print("|---|---|---|")
    for check in report.get("targets", []):
        print(f"| {check['target']} | {check['value']} | {'yes' if check['met'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

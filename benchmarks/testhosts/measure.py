# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Wall time of the test-host harness on the smoke topology (bastion + private host).

Run as root from the repository root, after ``source scripts/lib.sh && fk_setup``::

    python benchmarks/testhosts/measure.py [--cold] [--warm] [--repeat N]

``--cold`` uses a fresh, empty cache directory (``FK_CACHE``), so the image is
built with debootstrap and every package comes from Debian's archive; the
directory is removed afterwards. ``--warm`` uses the normal cache
(/var/cache/fleetkeeper) with the image built and the packages cached. Each
mode times ``molecule create``, ``converge``, ``verify`` and ``destroy`` one by
one, then a whole ``molecule test``. Results go to
benchmarks/results/testhosts.json; the method and figures are in
docs/testhosts.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lab.hosts import image as imagemod  # noqa: E402  pylint: disable=wrong-import-position

SCENARIO = "default"


def molecule(step: str, env: dict) -> float:
    started = time.monotonic()
    result = subprocess.run(["molecule", step, "-s", SCENARIO], cwd=os.path.join(ROOT, "extensions"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        print(result.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"molecule {step} failed")
    return round(elapsed, 1)


def measure(mode: str, cache: str | None) -> dict:
    env = dict(os.environ)
    if cache:
        env["FK_CACHE"] = cache
    figures: dict = {"mode": mode}
    molecule("destroy", env)
    for step in ("create", "converge", "verify", "destroy"):
        figures[step] = molecule(step, env)
        print(f"{mode}: molecule {step}: {figures[step]} s", flush=True)
    path = imagemod.image_dir(cache)
    info = imagemod.image_info(path)
    figures["image_build_seconds"] = info["build_seconds"]
    figures["image_size_bytes"] = info["size_bytes"]
    apt = os.path.join(cache or "/var/cache/fleetkeeper", "apt")
    figures["apt_cache_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _dirs, fs in os.walk(apt) for f in fs)
    figures["test"] = molecule("test", env)
    print(f"{mode}: molecule test: {figures['test']} s", flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--warm", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    modes = [m for m in ("cold", "warm") if getattr(args, m)] or ["warm"]
    out = os.path.join(ROOT, "benchmarks", "results", "testhosts.json")
    results = {}
    if os.path.exists(out):
        with open(out, encoding="utf-8") as handle:
            results = json.load(handle)
    for mode in modes:
        runs = []
        for _repeat in range(args.repeat):
            if mode == "cold":
                cache = tempfile.mkdtemp(prefix="fleetkeeper-cold-", dir="/var/cache")
                try:
                    runs.append(measure(mode, cache))
                finally:
                    subprocess.run([sys.executable, "-m", "lab.hosts", "cleanup"], cwd=ROOT, check=False,
                                   env=dict(os.environ, FK_CACHE=cache))
                    shutil.rmtree(cache, ignore_errors=True)
            else:
                runs.append(measure(mode, None))
        results[mode] = {"runs": runs, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "cpus": os.cpu_count()}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

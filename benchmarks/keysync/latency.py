# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Key sync with S3 latency: 1,000 users, 30 ms added to every S3 request (issue 13, point 12).

Each round, in alternating order:

* ``first_16``: first sync of an empty host with ``download_workers: 16`` (the default);
* ``unchanged_16``: the unchanged re-sync right after it (1 LIST, 0 GET expected);
* ``first_8``: first sync with 8 workers (the old default), for comparison;
* ``moto_list``: one bare ListObjectsV2 of the 1,000 keys through the same proxy (the emulator's floor).

The sync is the host-side entry point as the role installs it (``python3 -I fleetkeeper-keysync --json``, a
fresh process per run), accounts in the ``directory`` backend with root-owned key files under a temporary
root. The sync process is pinned to CPU 1 (``taskset``), moto and the fault proxy to CPU 0. The proxy's
``set_latency(30)`` sleeps 30 ms before forwarding every request.

Usage: .venv/bin/python benchmarks/keysync/latency.py [--users 1000] [--rounds 5] [--latency-ms 30]
Writes benchmarks/results/keysync_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import BUCKET, RESULTS, install_host_tool, seed  # noqa: E402
from lab.awsemu import AwsEmulator  # noqa: E402

SYNC_CPU = "1"
EMULATOR_CPU = {0}


def run_sync(emulator, script, config_path, latency_ms):
    emulator.proxy.reset()
    emulator.proxy.set_latency(latency_ms)
    env = dict(os.environ)
    env.update(emulator.env())
    argv = [sys.executable, "-I", script, "--config", config_path, "--json"]
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        argv = ["taskset", "-c", SYNC_CPU] + argv
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout)
    return {"wall_s": round(wall, 3), "sync_elapsed_s": result["elapsed"],
            "list_wait_s": result["timings"]["list_s"], "download_wait_s": result["timings"]["download_s"],
            "s3_requests": emulator.proxy.summary(), "users_created": len(result["users_created"])}


def bare_list(emulator, latency_ms):
    emulator.proxy.reset()
    emulator.proxy.set_latency(latency_ms)
    client = emulator.client("s3")
    start = time.monotonic()
    client.list_objects_v2(Bucket=BUCKET, Prefix="keys/", MaxKeys=1000)
    return {"wall_s": round(time.monotonic() - start, 3)}


class LatencyStub:
    """In-process S3 stand-in that only waits ``latency`` per request (no moto CPU): isolates the sync's own
    concurrency and local work from the emulator's cost on a loaded machine."""

    def __init__(self, bodies, latency):
        import hashlib  # pylint: disable=import-outside-toplevel
        self.bodies = bodies
        self.latency = latency
        self.etags = dict((k, '"%s"' % hashlib.md5(v).hexdigest()) for k, v in bodies.items())
        self.calls = {"list": 0, "get": 0}

    def list_objects_v2(self, Bucket, Prefix, MaxKeys, ContinuationToken=None):  # noqa: N803
        self.calls["list"] += 1
        time.sleep(self.latency)
        keys = sorted(self.bodies)
        return {"KeyCount": len(keys), "IsTruncated": False,
                "Contents": [{"Key": k, "ETag": self.etags[k], "Size": len(self.bodies[k])} for k in keys]}

    def get_object(self, Bucket, Key, IfMatch=None):  # noqa: N803
        import io  # pylint: disable=import-outside-toplevel
        self.calls["get"] += 1
        time.sleep(self.latency)
        return {"Body": io.BytesIO(self.bodies[Key])}


def isolated_rounds(users, rounds, latency_ms, tmp):
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import KeySyncConfig  # noqa
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_s3 import sync  # noqa
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import make_backend  # noqa
    from lab.keysync import ed25519_line  # noqa
    bodies = dict(("keys/user%04d.pub" % i, ed25519_line("user%04d@bench" % i).encode()) for i in range(users))
    out = {"first_16": [], "unchanged_16": []}
    for number in range(rounds):
        root = os.path.join(tmp, "isolated-%d" % number)
        config = KeySyncConfig(bucket=BUCKET, root=root, user_backend="directory", uid_max=2000000000,
                               authorized_keys_dir="/etc/ssh/authorized_keys")
        for name in ("first_16", "unchanged_16"):
            stub = LatencyStub(bodies, latency_ms / 1000.0)
            start = time.monotonic()
            sync(config, stub, make_backend(config))
            out[name].append({"wall_s": round(time.monotonic() - start, 3), "requests": dict(stub.calls)})
        shutil.rmtree(root)
    return out


def write_config(path, emulator, root, workers):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"bucket": BUCKET, "endpoint_url": emulator.endpoint_url, "region": "us-east-1",
                   "root": root, "user_backend": "directory", "authorized_keys_dir": "/etc/ssh/authorized_keys",
                   "download_workers": workers,
                   # 1,000 names in the default 40,000-UID range collide in about 12 pairs (refused until
                   # pinned); a wide range keeps every benchmark user
                   "uid_max": 2000000000}, handle)


def summary(values):
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "values": values}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--output", default=os.path.join(RESULTS, "keysync_latency.json"))
    parser.add_argument("--isolated-only", action="store_true",
                        help="only the in-process runs against the latency stub (no moto)")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, EMULATOR_CPU)  # moto and the proxy (started from here) run on CPU 0
    runs = {"first_16": [], "unchanged_16": [], "first_8": [], "moto_list": []}
    load = []
    if args.isolated_only:
        with tempfile.TemporaryDirectory(prefix="fk-bench-keysync-iso-") as tmp:
            load.append(os.getloadavg()[0])
            isolated = isolated_rounds(args.users, args.rounds, args.latency_ms, tmp)
            load.append(os.getloadavg()[0])
        previous = {}
        if os.path.exists(args.output):
            with open(args.output, encoding="utf-8") as handle:
                previous = json.load(handle)
        previous["isolated_in_process"] = {
            "note": "sync() called in-process (no interpreter start-up) against a stub that only sleeps %g ms per "
                    "request: the sync's concurrency and local work without moto's CPU cost; load average %s"
                    % (args.latency_ms, [round(x, 2) for x in load]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "runs": isolated,
            "wall_s": dict((n, summary([r["wall_s"] for r in v])) for n, v in isolated.items())}
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(previous, handle, indent=1, sort_keys=True)
        print(json.dumps(previous["isolated_in_process"]["wall_s"], indent=1))
        return 0
    with AwsEmulator() as emulator, tempfile.TemporaryDirectory(prefix="fk-bench-keysync-lat-") as tmp:
        seed(emulator, args.users)
        script = install_host_tool(os.path.join(tmp, "usr-local"))
        bare_list(emulator, args.latency_ms)  # warm moto's listing once
        for number in range(args.rounds):
            load.append(os.getloadavg()[0])
            order = ["16", "8"] if number % 2 == 0 else ["8", "16"]
            for workers in order:
                root = os.path.join(tmp, "root-%d-%s" % (number, workers))
                config_path = os.path.join(tmp, "keysync-%d-%s.json" % (number, workers))
                write_config(config_path, emulator, root, int(workers))
                runs["first_" + workers].append(run_sync(emulator, script, config_path, args.latency_ms))
                if workers == "16":
                    runs["unchanged_16"].append(run_sync(emulator, script, config_path, args.latency_ms))
                shutil.rmtree(root)
            runs["moto_list"].append(bare_list(emulator, args.latency_ms))
            print("round %d: %s" % (number + 1, dict((k, v[-1]["wall_s"]) for k, v in runs.items())), flush=True)
    results = {
        "users": args.users, "rounds": args.rounds, "latency_ms_per_request": args.latency_ms,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1min_per_round": [round(x, 2) for x in load],
                    "note": "shared 2-core machine, other helpers' jobs running (load average above); sync pinned "
                            "to CPU %s, moto and proxy to CPU 0" % SYNC_CPU},
        "runs": runs,
        "wall_s": dict((name, summary([r["wall_s"] for r in values])) for name, values in runs.items()),
    }
    unchanged = runs["unchanged_16"]
    results["targets"] = {
        "first_sync_at_most_5s_median": results["wall_s"]["first_16"]["median"] <= 5.0,
        "first_sync_at_most_5s_every_round": results["wall_s"]["first_16"]["max"] <= 5.0,
        "unchanged_one_list_no_get": all(r["s3_requests"] == {"s3:ListObjectsV2": 1} for r in unchanged),
        "unchanged_under_1s_median": results["wall_s"]["unchanged_16"]["median"] < 1.0,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, sort_keys=True)
    print(json.dumps({"wall_s": dict((k, {x: v[x] for x in ("median", "min", "max")})
                                     for k, v in results["wall_s"].items()), "targets": results["targets"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

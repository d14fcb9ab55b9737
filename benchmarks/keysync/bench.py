# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Key sync benchmark: 1,000 users in an S3 bucket on the moto server.

Measures three runs of the host-side entry point (``fleetkeeper-keysync``, the
program the role's timer starts, installed into a temporary /usr/local-like
tree exactly as the role installs it):

* first sync (empty host), unchanged re-sync, one key changed

and the same users applied by an ansible-playbook loop of
``ansible.posix.authorized_key`` (first run, unchanged re-run, one key
changed), after fetching the keys with boto3 (one listing page per 1,000 keys
and one GetObject per user, the least any S3-reading baseline can do).

The loop costs one module execution per user (about 1-2 s each on the shared
2-core benchmark machine), so it runs on ``--baseline-users`` users (default
100) in a bucket of that size, next to the sync on the same bucket; its
1,000-user time is extrapolated as playbook start-up (a run with no users,
measured) plus the measured per-user cost times 1,000. Both the measured
ratio (same N) and the extrapolated one are reported.

Reported per run: wall time and S3 requests by operation, as counted by the
fault proxy in front of moto. Nothing touches this machine's accounts: both
sides write below a temporary root (the sync with ``user_backend: directory``
and root-owned key files ``ROOT/etc/ssh/authorized_keys/<user>``; the loop with
``path: ROOT/keys/<user>`` for the user running it).

Usage (from the repository root, after scripts/lib.sh's fk_setup):
    .venv/bin/python benchmarks/keysync/bench.py [--users 1000] [--skip-baseline]
Writes benchmarks/results/keysync.json and keysync.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, ".build", "collections")]

from lab.ansiblerun import ansible_env  # noqa: E402
from lab.awsemu import AwsEmulator  # noqa: E402
from lab.keysync import ed25519_line, host_files, render_entry_point  # noqa: E402

BUCKET = "bench-bastion-keys"
RESULTS = os.path.join(REPO, "benchmarks", "results")


def install_host_tool(prefix):
    lib = os.path.join(prefix, "lib", "fleetkeeper-keysync", "ansible_collections", "fleetkeeper", "aws",
                       "plugins", "module_utils")
    os.makedirs(lib)
    for name in host_files(REPO):
        shutil.copy(os.path.join(REPO, "plugins", "module_utils", name), lib)
    os.makedirs(os.path.join(prefix, "sbin"))
    script = os.path.join(prefix, "sbin", "fleetkeeper-keysync")
    render_entry_point(REPO, script, sys.executable)
    return script


def timed_sync(emulator, script, config_path):
    emulator.proxy.reset()
    env = dict(os.environ)
    env.update(emulator.env())
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-I", script, "--config", config_path, "--json"],
                          capture_output=True, text=True, env=env, check=False)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    result = json.loads(proc.stdout)
    return {"wall_s": round(wall, 3), "sync_elapsed_s": result["elapsed"], "changed": result["changed"],
            "s3_wait_s": round(result["timings"]["list_s"] + result["timings"]["download_s"], 3),
            # interpreter + botocore start-up and the sync's own work: everything but waiting for S3
            "local_incl_startup_s": round(wall - result["timings"]["list_s"] - result["timings"]["download_s"], 3),
            "s3_requests": emulator.proxy.summary(), "users_created": len(result["users_created"]),
            "keys_added": len(result["keys_added"])}


def fetch_keys(emulator):
    """What a playbook must do before its loop: list the bucket and read every key file."""
    emulator.proxy.reset()
    s3 = emulator.client("s3")
    start = time.monotonic()
    keys = {}
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET, Prefix="keys/"):
        for item in page.get("Contents", []):
            name = item["Key"][len("keys/"):-len(".pub")]
            keys[name] = s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read().decode().strip()
    return keys, time.monotonic() - start, emulator.proxy.summary()


LOOP_PLAY = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: authorized_key per user
      ansible.posix.authorized_key:
        user: "{{ lookup('ansible.builtin.env', 'USER') | default('root', true) }}"
        path: "{{ keys_root }}/{{ item.key }}"
        key: "{{ item.value }}"
        manage_dir: false
        exclusive: true
      loop: "{{ users | dict2items }}"
      loop_control:
        label: "{{ item.key }}"
"""


def timed_loop(emulator, workdir, keys_root, empty=False):
    keys, fetch_s, requests = fetch_keys(emulator)
    if empty:
        keys, fetch_s, requests = {}, 0.0, {}
    vars_path = os.path.join(workdir, "users.json")
    with open(vars_path, "w", encoding="utf-8") as handle:
        json.dump({"users": keys, "keys_root": keys_root}, handle)
    play = os.path.join(workdir, "loop.yml")
    with open(play, "w", encoding="utf-8") as handle:
        handle.write(LOOP_PLAY)
    inventory = os.path.join(workdir, "inventory")
    with open(inventory, "w", encoding="utf-8") as handle:
        handle.write("localhost ansible_connection=local ansible_python_interpreter=%s\n" % sys.executable)
    env = ansible_env({"ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.null", "ANSIBLE_PIPELINING": "True"})
    env.pop("ANSIBLE_CALLBACK_RESULT_FORMAT", None)
    start = time.monotonic()
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", inventory,
                           play, "-e", "@" + vars_path], capture_output=True, text=True, env=env, check=False)
    loop_s = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return {"wall_s": round(fetch_s + loop_s, 3), "fetch_s": round(fetch_s, 3), "loop_s": round(loop_s, 3),
            "s3_requests": requests}


def moto_list_time(users):
    """The emulator's own floor: one bare ListObjectsV2 of the bucket, measured separately."""
    with AwsEmulator() as emulator:
        s3 = emulator.client("s3", direct=True)
        s3.create_bucket(Bucket=BUCKET)
        for i in range(users):
            s3.put_object(Bucket=BUCKET, Key="keys/user%04d.pub" % i, Body=b"x" * 100)
        times = []
        for _round in range(3):
            start = time.monotonic()
            s3.list_objects_v2(Bucket=BUCKET, Prefix="keys/", MaxKeys=1000)
            times.append(time.monotonic() - start)
    return round(min(times), 3)


def change_one(emulator, users):
    s3 = emulator.client("s3", direct=True)
    users["user0000"] = ed25519_line("user0000@rotated")
    s3.put_object(Bucket=BUCKET, Key="keys/user0000.pub", Body=users["user0000"].encode())


def plot(results, path):
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        print("matplotlib not installed; no plot", file=sys.stderr)
        return
    runs = ["first", "unchanged", "one_changed"]
    sync = [results["keysync"][r]["wall_s"] for r in runs]
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.38
    xs = range(len(runs))
    axis.bar([x - width / 2 for x in xs], sync, width, label="fleetkeeper-keysync")
    if results.get("authorized_key_loop"):
        loop = [results["authorized_key_loop"][r]["wall_s"] for r in runs]
        axis.bar([x + width / 2 for x in xs], loop, width, label="loop of ansible.posix.authorized_key")
    axis.set_yscale("log")
    axis.set_xticks(list(xs))
    axis.set_xticklabels(["first sync", "unchanged re-sync", "one key changed"])
    axis.set_ylabel("wall time, s (log scale)")
    axis.set_title("%d users in S3 (moto): key sync vs authorized_key loop\n(loop extrapolated from %s users)"
                   % (results["users"], results.get("baseline_users", "-")))
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def seed(emulator, count):
    s3 = emulator.client("s3", direct=True)
    s3.create_bucket(Bucket=BUCKET)
    users = dict(("user%04d" % i, ed25519_line("user%04d@bench" % i)) for i in range(count))
    for name, line in users.items():
        s3.put_object(Bucket=BUCKET, Key="keys/%s.pub" % name, Body=line.encode())
    return users


def seed_teams(emulator, users, teams):
    """A team manifest: user i in team i mod ``teams``. Returns the host's ``teams`` option: the first half of
    the teams admitted, the first one with sudo and a group."""
    names = sorted(users)
    manifest = dict(("team%02d" % t, names[t::teams]) for t in range(teams))
    s3 = emulator.client("s3", direct=True)
    s3.put_object(Bucket=BUCKET, Key="keys/_teams.json", Body=json.dumps(manifest).encode())
    return dict(("team%02d" % t, {"sudo": t == 0, "groups": ["dbadmin"] if t == 0 else []})
                for t in range(max(1, teams // 2)))


def run_sync_series(count, teams=0):
    with AwsEmulator() as emulator, tempfile.TemporaryDirectory(prefix="fk-bench-keysync-") as tmp:
        users = seed(emulator, count)
        script = install_host_tool(os.path.join(tmp, "usr-local"))
        config_path = os.path.join(tmp, "keysync.json")
        options = {"bucket": BUCKET, "endpoint_url": emulator.endpoint_url, "region": "us-east-1",
                   "root": os.path.join(tmp, "root"), "user_backend": "directory",
                   "authorized_keys_dir": "/etc/ssh/authorized_keys"}
        if teams:
            options["teams"] = seed_teams(emulator, users, teams)
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(options, handle)
        sync = {"first": timed_sync(emulator, script, config_path),
                "unchanged": timed_sync(emulator, script, config_path)}
        change_one(emulator, users)
        sync["one_changed"] = timed_sync(emulator, script, config_path)
        sync["unchanged_in_process"] = timed_in_process(emulator, config_path)
    return sync


def timed_in_process(emulator, config_path):
    """The same unchanged re-sync as a library call with a warm client (what the module's run costs
    once Ansible has started it): the sync's own work plus the listing, without interpreter start-up."""
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_host import load_config  # noqa
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_s3 import sync  # noqa
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import make_backend  # noqa

    config = load_config(config_path)
    client = emulator.client("s3")
    client.list_buckets()
    emulator.proxy.reset()
    start = time.monotonic()
    result = sync(config, client, make_backend(config))
    wall = time.monotonic() - start
    return {"wall_s": round(wall, 3), "changed": result["changed"], "s3_requests": emulator.proxy.summary(),
            "s3_wait_s": round(result["timings"]["list_s"] + result["timings"]["download_s"], 3),
            "local_s": round(wall - result["timings"]["list_s"] - result["timings"]["download_s"], 3)}


def run_loop_series(count):
    with AwsEmulator() as emulator, tempfile.TemporaryDirectory(prefix="fk-bench-keysync-") as tmp:
        users = seed(emulator, count)
        keys_root = os.path.join(tmp, "loop-keys")
        os.makedirs(keys_root)
        startup = timed_loop(emulator, tmp, keys_root, empty=True)["loop_s"]
        loop = {"first": timed_loop(emulator, tmp, keys_root), "unchanged": timed_loop(emulator, tmp, keys_root)}
        change_one(emulator, users)
        loop["one_changed"] = timed_loop(emulator, tmp, keys_root)
    return loop, startup


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--skip-baseline", action="store_true", help="only the sync (for a quick check)")
    parser.add_argument("--baseline-users", type=int, default=100,
                        help="users for the measured authorized_key loop (extrapolated to --users)")
    parser.add_argument("--teams", type=int, default=0,
                        help="only the sync, with a team manifest of this many teams (half of them admitted); "
                             "results to keysync_teams.json")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.teams:
        return main_teams(args)
    args.output = args.output or os.path.join(RESULTS, "keysync.json")
    results = {"users": args.users, "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results["keysync"] = run_sync_series(args.users)
    print(json.dumps({"keysync": results["keysync"]}, indent=1), flush=True)
    if not args.skip_baseline:
        n = args.baseline_users
        results["baseline_users"] = n
        results["keysync_at_baseline_users"] = run_sync_series(n)
        loop, startup = run_loop_series(n)
        results["authorized_key_loop_measured"] = loop
        results["authorized_key_loop_startup_s"] = startup
        extrapolated = {}
        for run, figures in loop.items():
            per_user = (figures["loop_s"] - startup) / n
            extrapolated[run] = {
                "wall_s": round(startup + per_user * args.users + figures["fetch_s"] * args.users / n, 1),
                "per_user_s": round(per_user, 3),
                "s3_requests": {"s3:ListObjectsV2": -(-args.users // 1000), "s3:GetObject": args.users},
            }
        results["authorized_key_loop"] = extrapolated
        results["speedup_first_sync_measured_at_baseline_users"] = round(
            loop["first"]["wall_s"] / results["keysync_at_baseline_users"]["first"]["wall_s"], 1)
        results["speedup_first_sync"] = round(extrapolated["first"]["wall_s"] / results["keysync"]["first"]["wall_s"], 1)
        print(json.dumps({"authorized_key_loop_measured": loop, "extrapolated": extrapolated}, indent=1), flush=True)
    unchanged = results["keysync"]["unchanged"]
    results["moto_list_1000_s"] = moto_list_time(args.users)
    lists_needed = -(-args.users // 1000)
    results["targets"] = {
        "unchanged_list_requests_per_1000_keys": unchanged["s3_requests"].get("s3:ListObjectsV2", 0) == lists_needed,
        "unchanged_no_downloads": "s3:GetObject" not in unchanged["s3_requests"],
        "unchanged_under_1s": unchanged["wall_s"] < 1.0,
        "unchanged_in_process_work_under_1s": results["keysync"]["unchanged_in_process"]["local_s"] < 1.0,
    }
    if "speedup_first_sync" in results:
        results["targets"]["first_sync_50x_faster_than_loop"] = results["speedup_first_sync"] >= 50
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, sort_keys=True)
    plot(results, os.path.splitext(args.output)[0] + ".png")
    print(json.dumps(results["targets"], indent=1))
    return 0


def main_teams(args):
    """The teams case: the unchanged re-sync must still cost one LIST per 1,000 keys and no GET."""
    results = {"users": args.users, "teams": args.teams,
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "keysync": run_sync_series(args.users, args.teams)}
    unchanged = results["keysync"]["unchanged"]
    results["targets"] = {
        # the manifest is one more object in the pages: 1,000 users and the manifest take two
        "unchanged_list_requests_per_1000_objects":
            unchanged["s3_requests"].get("s3:ListObjectsV2", 0) == -(-(args.users + 1) // 1000),
        "unchanged_no_downloads": "s3:GetObject" not in unchanged["s3_requests"],
        "first_downloads_every_key_and_the_manifest_once":
            results["keysync"]["first"]["s3_requests"].get("s3:GetObject") == args.users + 1,
    }
    output = args.output or os.path.join(RESULTS, "keysync_teams.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, sort_keys=True)
    print(json.dumps(results, indent=1))
    return 0 if all(results["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The README's main job: the whole collection on the embedded default.

Run through ``scripts/demo.sh`` (which installs what it needs first):

1. start the local AWS endpoint (moto in server mode) and seed a small fleet;
2. show the fleet through the ``fleetkeeper.aws.fleet`` inventory;
3. roll out an instance profile with ``fleetkeeper.aws.instance_profiles``, twice;
   then IMDSv2 the safe way: find the IMDSv1 users (inventory group, CloudWatch
   MetadataNoToken in a dry run), fix them, require tokens;
4. boot a bastion and a private test host and run ``fleetkeeper.aws.site``
   on them, log in as a synced user through the bastion, read the DNS cache's
   statistics;
5. put a launch lifecycle hook on one group, scale it out by one, show the new
   instance held in Pending:Wait, configure the private test host standing in
   for it with ``fleetkeeper.aws.provision`` and see the instance go InService;
6. clean up everything it started, also when interrupted.

Nothing here reaches AWS or any address outside this machine and the test
hosts' own network namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from lab import fleet as fleetlib  # noqa: E402  pylint: disable=wrong-import-position
from lab import metadata_options as imdslib  # noqa: E402  pylint: disable=wrong-import-position
from lab.ansiblerun import plain  # noqa: E402  pylint: disable=wrong-import-position
from lab.awsemu import TEST_CREDENTIALS, AwsEmulator  # noqa: E402  pylint: disable=wrong-import-position

# Where the demo keeps its files; FK_DEMO_WORK moves it (tests/integration/test_demo_warnings.py).
WORK = os.path.abspath(os.environ.get("FK_DEMO_WORK") or os.path.join(REPO_ROOT, ".build", "demo"))
REGION = "us-east-1"
BUCKET = "fleetkeeper-demo-keys"
PREFIX = "keys/"
USERS = ("alice", "bob")
PROFILE = "fleetkeeper-demo"
BIN = os.path.dirname(sys.executable)
DNS_SCENARIO = os.path.join(REPO_ROOT, "extensions", "molecule", "dns_cache")
UPSTREAM_ADDRESS = "10.0.53.53"

# The demo's test hosts (Debian 12): a bastion on the public and private
# networks, a private host only the bastion reaches, and a BIND on the
# private network standing in for the VPC resolver (authoritative for fk.test).
# Group names differ from host names, so Ansible never has to choose between
# a group and a host of the same name.
PLATFORMS = [
    {"name": "bastion", "groups": ["bastions", "dns_cache_hosts"],
     "networks": [{"name": "public", "address": "10.213.0.10"}, {"name": "private", "address": "10.0.53.10"}]},
    {"name": "private", "groups": ["app_hosts", "dns_cache_hosts"], "proxy_jump": "bastion",
     "networks": [{"name": "private", "address": "10.0.53.20"}]},
    {"name": "upstream", "groups": ["dns_upstream"], "proxy_jump": "bastion",
     "networks": [{"name": "private", "address": UPSTREAM_ADDRESS}]},
]
# How each cache host's resolver starts out (the dns_cache scenario's prepare step reads it).
MECHANISMS = {"bastion": "static", "private": "static"}


def headline(number, text):
    print(f"\n\033[1m=== {number}. {text}\033[0m", flush=True)


def note(text):
    print(f"--> {text}", flush=True)


def ansible_env(extra=None):
    env = dict(os.environ)
    env.update(TEST_CREDENTIALS)
    env.update({
        "ANSIBLE_COLLECTIONS_PATH": os.path.join(REPO_ROOT, ".build", "collections"),
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
        "PATH": BIN + os.pathsep + env.get("PATH", ""),
    })
    env.update(extra or {})
    return env


def run(argv, env=None, capture=False, check=True):
    print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    result = subprocess.run(argv, env=env or ansible_env(), text=True, check=False,
                            capture_output=capture, cwd=WORK)
    if capture:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: `{argv[0]}` failed with exit code {result.returncode}")
    return result


def recap_changes(output):
    """Total of changed= over the PLAY RECAP lines."""
    return sum(int(n) for n in re.findall(r"\bchanged=(\d+)", output.split("PLAY RECAP", 1)[-1]))


def local_inventory():
    path = os.path.join(WORK, "localhost.ini")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    return path


# --- the steps ------------------------------------------------------------------------------

def step_endpoint(emulator):
    headline(1, "Local AWS endpoint (moto server) and a small fleet")
    emulator.start()
    note(f"AWS endpoint: {emulator.endpoint_url} (moto server behind the harness's proxy)")
    fleet = fleetlib.demo_fleet(emulator, REGION)
    note(f"VPC {fleet.vpc_id} ({fleet.vpc_cidr}), public subnet {fleet.public_subnet}, "
         f"private subnet {fleet.private_subnet}")
    note(f"bastion instance {fleet.bastion_id}")
    for name, instances in fleet.groups.items():
        note(f"Auto Scaling group {name}: {len(instances)} instances from launch template {name}-lt")
    keys = {}
    key_dir = os.path.join(WORK, "keys")
    for user in USERS:
        public, private = fleetlib.ssh_keypair(f"{user}@demo")
        fleetlib.write_private_key(key_dir, user, private)
        keys[user] = public + "\n"
    fleetlib.upload_keys(emulator.client("s3", REGION), BUCKET, keys, prefix=PREFIX)
    note(f"bucket s3://{BUCKET}/{PREFIX}: {', '.join(u + '.pub' for u in USERS)} (private keys in {key_dir})")
    return fleet


def step_inventory(emulator):
    headline(2, "The fleet as Ansible sees it: the fleetkeeper.aws.fleet inventory")
    path = os.path.join(WORK, "demo.fleet.yml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(
            "plugin: fleetkeeper.aws.fleet\n"
            f"regions: [{REGION}]\n"
            f"endpoint_url: {emulator.endpoint_url}\n"
            "bastion:\n"
            "  tag: fleetkeeper:role=bastion\n"
            "  user: admin\n"
            "keyed_groups:\n"
            "  - key: ec2_tags['fleetkeeper:fleet'] | default('none')\n"
            "    prefix: fleet\n"
        )
    note(f"inventory source {path}:")
    with open(path, encoding="utf-8") as handle:
        print(handle.read())
    run([os.path.join(BIN, "ansible-inventory"), "-i", path, "--graph"])
    result = subprocess.run([os.path.join(BIN, "ansible-inventory"), "-i", path, "--list"],
                            env=ansible_env(), text=True, capture_output=True, check=True, cwd=WORK)
    hostvars = json.loads(result.stdout)["_meta"]["hostvars"]
    for host, facts in sorted(hostvars.items())[:1]:
        wanted = ("asg_", "launch_template", "instance_profile", "lifecycle", "health", "ansible_ssh")
        shown = {k: v for k, v in facts.items() if k.startswith(wanted)}
        note(f"host vars of {host}:")
        print(json.dumps(plain(shown), indent=2, sort_keys=True))


def step_instance_profiles(emulator):
    headline(3, "Instance profiles, never credentials: fleetkeeper.aws.instance_profiles")
    extra = {
        "instance_profile_name": PROFILE,
        "instance_profile_asg_tag_filters": {"fleetkeeper:fleet": ["web", "worker"]},
        "instance_profile_inline_policies": {
            "read-operator-keys": {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{BUCKET}"},
                    {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/{PREFIX}*"},
                ],
            }
        },
        "instance_profile_aws_endpoint_url": emulator.endpoint_url,
        "instance_profile_aws_region": REGION,
        # IMDSv2 comes next, with its migration path (step_imdsv2).
        "instance_profile_metadata_options": {},
    }
    vars_file = os.path.join(WORK, "instance_profiles.json")
    with open(vars_file, "w", encoding="utf-8") as handle:
        json.dump(extra, handle)
    argv = [os.path.join(BIN, "ansible-playbook"), "-i", local_inventory(), "fleetkeeper.aws.instance_profiles",
            "-e", f"@{vars_file}"]
    first = run(argv, capture=True)
    note(f"first run: {recap_changes(first.stdout)} changes")
    second = run(argv, capture=True)
    changes = recap_changes(second.stdout)
    note(f"second run: {changes} changes")
    if changes:
        raise SystemExit("demo: the second instance profile run changed something; it must not")


def step_imdsv2(emulator, fleet):
    headline("3b", "IMDSv2 without breaking anyone: find IMDSv1 users, fix them, require tokens")
    legacy = fleet.groups["worker"][0]
    # EC2 publishes MetadataNoToken per instance; here a legacy agent on one worker made 96 IMDSv1 calls
    # three days ago, and none since its SDK was updated.
    imdslib.put_v1_calls(emulator.client("cloudwatch", REGION), legacy, 96, days_ago=3)
    inventory = os.path.join(WORK, "demo.fleet.yml")
    note("hosts whose metadata service still answers without a token (inventory group imdsv1):")
    run([os.path.join(BIN, "ansible-inventory"), "-i", inventory, "--graph", "imdsv1"])
    playbook = os.path.join(WORK, "imdsv2.yml")
    with open(playbook, "w", encoding="utf-8") as handle:
        json.dump([{
            "name": "IMDSv2 on the web and worker fleets", "hosts": "localhost", "gather_facts": False,
            "module_defaults": {"group/fleetkeeper.aws.aws": {"endpoint_url": emulator.endpoint_url,
                                                              "region": REGION}},
            "tasks": [{
                "name": "Require IMDSv2 tokens, hop limit 1",
                "fleetkeeper.aws.asg_metadata_options": {
                    "tag_filters": {"fleetkeeper:fleet": ["web", "worker"]},
                    "metadata_options": {"http_tokens": "required", "http_put_response_hop_limit": 1},
                    "imdsv1_window_days": "{{ window | default(14) | int }}"},
            }],
        }], handle)
    argv = [os.path.join(BIN, "ansible-playbook"), "-i", local_inventory(), playbook]
    note("dry run (--check): CloudWatch MetadataNoToken over 14 days; a group with IMDSv1 users is refused")
    dry = run(argv + ["--check"], capture=True, check=False)
    if dry.returncode == 0 or legacy not in dry.stdout:
        raise SystemExit(f"demo: the dry run did not refuse the worker group with IMDSv1 user {legacy}")
    note(f"the dry run named {legacy}; its agent was updated three days ago, so look at the last two days only")
    first = run(argv + ["-e", "window=2"], capture=True)
    note(f"first run: {recap_changes(first.stdout)} changes")
    second = run(argv + ["-e", "window=2"], capture=True)
    changes = recap_changes(second.stdout)
    note(f"second run: {changes} changes")
    if changes:
        raise SystemExit("demo: the second IMDSv2 run changed something; it must not")
    remaining = subprocess.run([os.path.join(BIN, "ansible-inventory"), "-i", inventory, "--list"],
                               env=ansible_env(), text=True, capture_output=True, check=True, cwd=WORK)
    left = json.loads(remaining.stdout).get("imdsv1", {}).get("hosts", [])
    note(f"hosts still answering IMDSv1 (inventory group imdsv1): {len(left)}")
    if left:
        raise SystemExit(f"demo: hosts still answer IMDSv1 after the roll-out: {left}")


def step_hosts(emulator, ephemeral):
    headline(4, "Test hosts (bastion, private host) and fleetkeeper.aws.site on them")
    from lab.hosts import launcher  # pylint: disable=import-outside-toplevel

    from lab.hosts import state as runstate  # pylint: disable=import-outside-toplevel

    # The demo owns the run like `molecule test` would: if the demo is killed,
    # the harness's watchdog removes the hosts.
    owner = {**runstate.process_identity(os.getpid()), "command": "test"}
    testhosts = launcher.create(PLATFORMS, ephemeral, None, "demo", aws_endpoint=emulator.endpoint_url, owner=owner)
    inventory_dir = os.path.join(ephemeral, "inventory")
    groups = {}
    for platform in PLATFORMS:
        for group in platform.get("groups", []):
            groups.setdefault(group, {"hosts": {}})["hosts"][platform["name"]] = None
    with open(os.path.join(inventory_dir, "groups.json"), "w", encoding="utf-8") as handle:
        json.dump({"all": {"children": groups, "vars": {"dns_cache_test_upstream": UPSTREAM_ADDRESS,
                                                        "dns_cache_test_mechanisms": MECHANISMS,
                                                        "molecule_ephemeral_directory": ephemeral}}}, handle)
    hosts = testhosts["testhosts_hosts"]
    note("hosts: " + ", ".join(f"{name} {facts['ansible_host']}" for name, facts in sorted(hosts.items())))
    playbook = os.path.join(BIN, "ansible-playbook")
    note("the stand-in VPC resolver (BIND, zone fk.test) on the private network, as in the dns_cache Molecule scenario")
    run([playbook, "-i", inventory_dir, os.path.join(DNS_SCENARIO, "prepare.yml")])
    site_vars = {
        "fleetkeeper_bastion_hosts": "bastion:private",
        "bastion_keys_bucket": BUCKET,
        "bastion_keys_prefix": PREFIX,
        "bastion_keys_region": REGION,
        "bastion_keys_endpoint_url": "{{ testhosts_hosts[inventory_hostname].aws_endpoint_url }}",
        # Test hosts have no instance profile: the endpoint's test credentials stand in for it.
        "bastion_keys_sync_environment": {k: TEST_CREDENTIALS[k] for k in ("AWS_ACCESS_KEY_ID",
                                                                           "AWS_SECRET_ACCESS_KEY")},
        # Ansible logs in to the test hosts as root with a key: keep that login working.
        "bastion_keys_admin_groups": ["root", "sudo"],
        "bastion_keys_sshd_permit_root_login": "prohibit-password",
        "dns_cache_hosts": "dns_cache_hosts",
        "dns_cache_upstreams": [{"address": UPSTREAM_ADDRESS}],
    }
    vars_file = os.path.join(WORK, "site.json")
    with open(vars_file, "w", encoding="utf-8") as handle:
        json.dump(site_vars, handle)
    run([playbook, "-i", inventory_dir, "fleetkeeper.aws.site", "-e", f"@{os.path.join(ephemeral, 'testhosts.yml')}",
         "-e", f"@{vars_file}"])

    user = USERS[0]
    key = os.path.join(WORK, "keys", user)
    known_hosts = testhosts["testhosts_ssh_known_hosts"]
    ssh = ["ssh", "-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
           "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]
    bastion = hosts["bastion"]["ansible_host"]
    private = hosts["private"]["addresses"]["private"]
    jump = " ".join(shlex.quote(a) for a in ssh + ["-W", "%h:%p", f"{user}@{bastion}"])
    note(f"{user} logs in to the private host through the bastion with the key from S3")
    run(ssh + ["-o", f"ProxyCommand={jump}", f"{user}@{private}", "echo \"$(id -un) on $(hostname)\"; id"],
        env=dict(os.environ))

    note("a few lookups through the cache on every host, then its statistics")
    ansible = os.path.join(BIN, "ansible")
    for _round in range(3):
        run([ansible, "-i", inventory_dir, "dns_cache_hosts", "-m", "ansible.builtin.command",
             "-a", "getent hosts www.fk.test api.fk.test"], capture=True)
    run([ansible, "-i", inventory_dir, "dns_cache_hosts", "-m", "fleetkeeper.aws.dns_cache_stats"])


def step_scale_out(emulator, ephemeral):
    """A launch hook on one group, a scale-out by one, the new instance held in Pending:Wait until
    fleetkeeper.aws.provision has configured the test host standing in for it; then it is InService."""
    import yaml  # pylint: disable=import-outside-toplevel

    headline(5, "Scale-out: a launch hook holds the new instance until fleetkeeper.aws.provision configured it")
    group, hook = "worker", "fleetkeeper-provision"
    playbook = os.path.join(BIN, "ansible-playbook")
    hook_playbook = os.path.join(WORK, "lifecycle_hook.yml")
    with open(hook_playbook, "w", encoding="utf-8") as handle:
        yaml.safe_dump([{
            "name": "Hold new instances of one group until they are configured",
            "hosts": "localhost", "gather_facts": False,
            "tasks": [{"name": "A launch hook on the worker group",
                       "fleetkeeper.aws.asg_lifecycle_hook": {
                           "names": [group], "hook_name": hook, "heartbeat_timeout": 600,
                           "default_result": "ABANDON", "endpoint_url": emulator.endpoint_url, "region": REGION}}],
        }], handle, sort_keys=False)
    run([playbook, "-i", local_inventory(), hook_playbook])

    autoscaling = emulator.client("autoscaling", REGION)
    desired = autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=[group])["AutoScalingGroups"][0]["DesiredCapacity"]
    note(f"scale {group} out by one: desired capacity {desired} -> {desired + 1}")
    autoscaling.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=desired + 1)

    pending_source = os.path.join(WORK, "pending.fleet.yml")
    with open(pending_source, "w", encoding="utf-8") as handle:
        handle.write("plugin: fleetkeeper.aws.fleet\n"
                     f"regions: [{REGION}]\n"
                     f"endpoint_url: {emulator.endpoint_url}\n"
                     "lifecycle_states: [Pending:Wait]\n")
    note("the pending inventory (lifecycle_states: [Pending:Wait]) shows the new instance, held by the hook:")
    run([os.path.join(BIN, "ansible-inventory"), "-i", pending_source, "--graph", "lifecycle_pending_wait"])
    listed = subprocess.run([os.path.join(BIN, "ansible-inventory"), "-i", pending_source, "--list"],
                            env=ansible_env(), text=True, capture_output=True, check=True, cwd=WORK)
    [pending] = [plain(v) for v in json.loads(listed.stdout)["_meta"]["hostvars"].values()]
    note(f"{pending['instance_id']}: lifecycle_state {pending['lifecycle_state']}, "
         f"lifecycle_hook_name {pending.get('lifecycle_hook_name')}")

    # No real instance boots here: the private test host (Debian 12, behind the bastion) stands in for it,
    # with the pending instance's identity.
    with open(os.path.join(ephemeral, "inventory", "testhosts_inventory.yml"), encoding="utf-8") as handle:
        connection = yaml.safe_load(handle)["all"]["hosts"]["private"]
    stand_in = dict(connection, **{key: pending[key] for key in ("instance_id", "asg_name", "region",
                                                                 "lifecycle_state", "lifecycle_hook_name")})
    stand_in["dns_cache_upstreams"] = [{"address": UPSTREAM_ADDRESS}]
    stand_in_inventory = os.path.join(WORK, "pending_stand_in.yml")
    with open(stand_in_inventory, "w", encoding="utf-8") as handle:
        yaml.safe_dump({"all": {"children": {"lifecycle_pending_wait": {"hosts": {"new_worker": stand_in}}}}}, handle)
    note("fleetkeeper.aws.provision converges the stand-in through the bastion and completes the action")
    started = time.monotonic()
    run([playbook, "-i", stand_in_inventory, "fleetkeeper.aws.provision", "-e", json.dumps({
        "provision_aws_endpoint_url": emulator.endpoint_url,
        "provision_roles": [{"name": "fleetkeeper.aws.dns_cache"}]})])
    [record] = autoscaling.describe_auto_scaling_instances(InstanceIds=[pending["instance_id"]])["AutoScalingInstances"]
    note(f"{pending['instance_id']} is {record['LifecycleState']} {time.monotonic() - started:.0f}s after the "
         "playbook started")
    if record["LifecycleState"] != "InService":
        raise SystemExit(f"demo: {pending['instance_id']} is {record['LifecycleState']}, not InService")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--skip-hosts", action="store_true", help="stop after the AWS steps (no test hosts)")
    args = parser.parse_args(argv)
    os.makedirs(WORK, exist_ok=True)
    ephemeral = os.path.join(WORK, "hosts")

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)

    emulator = AwsEmulator()
    started = time.monotonic()
    try:
        fleet = step_endpoint(emulator)
        step_inventory(emulator)
        step_instance_profiles(emulator)
        step_imdsv2(emulator, fleet)
        if not args.skip_hosts:
            step_hosts(emulator, ephemeral)
            step_scale_out(emulator, ephemeral)
    finally:
        headline(6, "Clean-up")
        if not args.skip_hosts and os.path.isdir(ephemeral):
            from lab.hosts import teardown  # pylint: disable=import-outside-toplevel

            teardown.destroy(ephemeral)
            note("test hosts, their namespaces and veths removed")
        emulator.stop()
        note("AWS endpoint stopped")
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

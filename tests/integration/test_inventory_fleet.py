# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleetkeeper.aws.fleet inventory plugin end to end: ansible-inventory against the moto server."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from lab import fleet as fl
from lab.ansiblerun import plain, BIN_DIR, REPO_ROOT, ansible_env

EU = "eu-west-1"


def write_config(tmp_path, aws, name="test.fleet.yml", **options):
    config = {"plugin": "fleetkeeper.aws.fleet", "regions": ["us-east-1"], "endpoint_url": aws.endpoint_url}
    config.update(options)
    path = tmp_path / name
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


def inventory(path, *args, env=None, aws=None, unparsed_failed=True):
    extra = dict(aws.env()) if aws else {}
    extra.update(env or {})
    run_env = ansible_env(extra)
    if not unparsed_failed:
        run_env.pop("ANSIBLE_INVENTORY_UNPARSED_FAILED")
    command = [os.path.join(BIN_DIR, "ansible-inventory"), "-i", path, *(args or ("--list",))]
    return subprocess.run(command, env=run_env, capture_output=True, text=True, check=False)


def listed(path, aws, **kwargs):
    proc = inventory(path, "--list", aws=aws, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return plain(json.loads(proc.stdout)), proc


def hosts_of(data, group):
    return sorted(data.get(group, {}).get("hosts", []))


def hostvars(data):
    return data["_meta"]["hostvars"]


@pytest.fixture
def two_regions(aws):
    """web (3) and worker (2) with a bastion in us-east-1, api (2) in eu-west-1."""
    east = fl.demo_fleet(aws)
    ec2_eu, as_eu = aws.client("ec2", EU), aws.client("autoscaling", EU)
    west = fl.create_network(ec2_eu, EU, cidr="10.43.0.0/16")
    fl.create_group(ec2_eu, as_eu, west, "api", 2, tags={"fleetkeeper:fleet": "api"})
    aws.proxy.reset()
    return east, west


@pytest.mark.compat
def test_graph_list_and_host_across_two_regions(aws, tmp_path, two_regions):
    east, west = two_regions
    path = write_config(tmp_path, aws, regions=["us-east-1", EU],
                        bastion={"tag": "fleetkeeper:role=bastion", "user": "admin"})
    data, proc = listed(path, aws)
    assert "WARNING" not in proc.stderr, proc.stderr
    assert "DEPRECATION" not in proc.stderr, proc.stderr
    variables = hostvars(data)
    by_id = {v["instance_id"]: name for name, v in variables.items()}
    assert sorted(by_id[i] for i in east.groups["web"]) == hosts_of(data, "asg_web")
    assert sorted(by_id[i] for i in east.groups["worker"]) == hosts_of(data, "asg_worker")
    assert sorted(by_id[i] for i in west.groups["api"]) == hosts_of(data, "asg_api")
    assert len(hosts_of(data, "region_eu_west_1")) == 2
    assert len(hosts_of(data, "region_us_east_1")) == 5 + 0  # the bastion is in no ASG and no region group
    assert hosts_of(data, "bastion") == [by_id[east.bastion_id]]
    assert len(hosts_of(data, "lifecycle_inservice")) == 7

    web = variables[by_id[east.groups["web"][0]]]
    assert web["asg_name"] == "web"
    assert web["lifecycle_state"] == "InService" and web["health_status"] == "Healthy"
    assert web["availability_zone"] == "us-east-1b" and web["region"] == "us-east-1"
    assert web["subnet_id"] == east.private_subnet and web["vpc_id"] == east.vpc_id
    assert web["private_ip_address"].startswith("10.42.1.") and web["public_ip_address"] is None
    assert web["instance_type"] == "t3.small"
    assert web["launch_template_id"] == east.launch_templates["web-lt"]
    assert web["launch_template_version"] == 1 and web["launch_template_target_version"] == 1
    assert web["launch_template_drift"] is False
    assert web["ec2_tags"]["fleetkeeper:fleet"] == "web"
    assert "tags" not in web
    # Private hosts have no DNS name: the hostname falls back to the private IP; ssh goes through the bastion.
    assert by_id[east.groups["web"][0]] == web["private_ip_address"] == web["ansible_host"]
    bastion = variables[by_id[east.bastion_id]]
    assert web["ansible_ssh_common_args"] == f"-o ProxyJump=admin@{bastion['public_ip_address']}"
    assert "ansible_ssh_common_args" not in bastion

    graph = inventory(path, "--graph", aws=aws)
    assert graph.returncode == 0, graph.stderr
    assert "@asg_api:" in graph.stdout and "@bastion:" in graph.stdout
    one = inventory(path, "--host", by_id[west.groups["api"][0]], aws=aws)
    assert one.returncode == 0, one.stderr
    assert plain(json.loads(one.stdout))["asg_name"] == "api"


@pytest.mark.compat
def test_fast_host_vars_builds_the_same_inventory_as_the_plain_api(aws, tmp_path, two_regions):
    """fast_host_vars fills ansible-core's InventoryData directly: same hosts, groups, parents and vars."""
    options = {"regions": ["us-east-1", EU], "bastion": {"tag": "fleetkeeper:role=bastion", "user": "admin"},
               "lifecycle_states": ["InService", "Standby"],
               "keyed_groups": [{"key": "instance_type", "prefix": "type", "parent_group": "by_type"}],
               "groups": {"web_or_api": "asg_name in ['web', 'api']"}, "compose": {"fleet": "asg_name"}}
    fast = listed(write_config(tmp_path, aws, name="fast.fleet.yml", **options), aws)[0]
    slow = listed(write_config(tmp_path, aws, name="slow.fleet.yml", fast_host_vars=False, **options), aws)[0]
    assert fast == slow
    assert len(hostvars(fast)) == 8
    assert fast["by_type"]["children"] == ["type_t3_micro", "type_t3_small"]
    graph = inventory(write_config(tmp_path, aws, name="fast.fleet.yml", **options), "--graph", aws=aws)
    assert "@web_or_api:" in graph.stdout and "@ungrouped:" in graph.stdout
    # The magic variables add_host() sets are there too (debug runs on the controller, nothing connects).
    host = sorted(hostvars(fast))[0]
    env = ansible_env(dict(aws.env()))
    proc = subprocess.run([os.path.join(BIN_DIR, "ansible"), "-i", str(tmp_path / "fast.fleet.yml"), host, "-m",
                           "ansible.builtin.debug", "-a", "msg={{ inventory_file }}|{{ inventory_dir }}"],
                          env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{tmp_path / 'fast.fleet.yml'}|{tmp_path}" in proc.stdout


@pytest.mark.compat
def test_shared_values_are_set_once_per_asg_group_and_hosts_see_the_same_variables(aws, tmp_path, two_regions):
    """asg_group_vars: --export holds an ASG's shared values once, on its group; every other view is unchanged."""
    options = {"regions": ["us-east-1", EU], "bastion": {"tag": "fleetkeeper:role=bastion", "user": "admin"},
               "keyed_groups": [{"key": "instance_type", "prefix": "type"}],
               "groups": {"web_or_api": "asg_name in ['web', 'api']"}, "compose": {"fleet": "asg_name"}}
    grouped = write_config(tmp_path, aws, name="grouped.fleet.yml", **options)
    per_host = write_config(tmp_path, aws, name="per_host.fleet.yml", asg_group_vars=False, **options)
    assert listed(grouped, aws)[0] == listed(per_host, aws)[0]
    some_host = sorted(hostvars(listed(grouped, aws)[0]))[0]
    assert plain(json.loads(inventory(grouped, "--host", some_host, aws=aws).stdout)) == \
        plain(json.loads(inventory(per_host, "--host", some_host, aws=aws).stdout))

    exported = inventory(grouped, "--list", "--export", aws=aws)
    assert exported.returncode == 0, exported.stderr
    data = plain(json.loads(exported.stdout))
    web = data["asg_web"]
    assert web["vars"]["asg_name"] == "web" and web["vars"]["instance_type"] and "ec2_tags" in web["vars"]
    for name in web["hosts"]:
        own = hostvars(data)[name]
        assert "asg_name" not in own and "instance_type" not in own
        assert {"ansible_host", "instance_id", "private_ip_address", "launch_time"} <= set(own)
        assert own["fleet"] == "web", "compose saw the group's shared values"
    assert sorted(data["web_or_api"]["hosts"]) == sorted(web["hosts"] + data["asg_api"]["hosts"])
    # The bastion reaches no one through itself: the ssh arguments stay on the hosts that need them.
    assert "ansible_ssh_common_args" not in hostvars(data)[sorted(data["bastion"]["hosts"])[0]]
    flat = plain(json.loads(inventory(per_host, "--list", "--export", aws=aws).stdout))
    assert "vars" not in flat["asg_web"] and "asg_name" in hostvars(flat)[web["hosts"][0]]


def test_api_calls_stay_within_the_budget(aws, tmp_path, two_regions):
    path = write_config(tmp_path, aws, regions=["us-east-1", EU])
    listed(path, aws)
    summary = aws.proxy.summary()
    # one ASG page, one instance batch and one launch template lookup per region
    assert summary == {
        "autoscaling:DescribeAutoScalingGroups": 2,
        "ec2:DescribeInstances": 2,
        "ec2:DescribeLaunchTemplates": 2,
    }


def test_lifecycle_and_health(aws, tmp_path):
    fleet = fl.demo_fleet(aws, groups={"web": 3})
    autoscaling = aws.client("autoscaling")
    standby, sick, healthy = fleet.groups["web"]
    autoscaling.enter_standby(InstanceIds=[standby], AutoScalingGroupName="web", ShouldDecrementDesiredCapacity=True)
    autoscaling.set_instance_health(InstanceId=sick, HealthStatus="Unhealthy")

    data = listed(write_config(tmp_path, aws), aws)[0]
    ids = {v["instance_id"]: v for v in hostvars(data).values()}
    assert standby not in ids
    assert ids[sick]["health_status"] == "Unhealthy" and ids[healthy]["health_status"] == "Healthy"

    data = listed(write_config(tmp_path, aws, name="all.fleet.yml", lifecycle_states=["InService", "Standby"]), aws)[0]
    ids = {v["instance_id"]: (name, v) for name, v in hostvars(data).items()}
    assert ids[standby][1]["lifecycle_state"] == "Standby"
    assert hosts_of(data, "lifecycle_standby") == [ids[standby][0]]
    assert len(hosts_of(data, "asg_web")) == 3


def test_launch_template_drift(aws, tmp_path):
    fleet = fl.demo_fleet(aws, groups={"web": 2})
    ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
    template = fleet.launch_templates["web-lt"]
    path = write_config(tmp_path, aws)
    data = listed(path, aws)[0]
    assert hosts_of(data, "launch_template_drift") == []

    ec2.create_launch_template_version(LaunchTemplateId=template, SourceVersion="1",
                                       LaunchTemplateData={"InstanceType": "t3.medium"})
    data = listed(path, aws)[0]  # the ASG follows $Latest, now version 2: both instances run version 1
    web = hostvars(data)
    assert sorted(hosts_of(data, "launch_template_drift")) == sorted(web)
    assert all(v["launch_template_target_version"] == 2 and v["launch_template_drift"] for v in web.values())

    autoscaling.update_auto_scaling_group(AutoScalingGroupName="web",
                                          LaunchTemplate={"LaunchTemplateId": template, "Version": "1"})
    aws.proxy.reset()
    data = listed(path, aws)[0]  # pinned back to version 1: no drift, and no template lookup needed
    assert hosts_of(data, "launch_template_drift") == []
    assert aws.proxy.count("ec2", "DescribeLaunchTemplates") == 0


def test_instance_profile_arn(aws, tmp_path):
    fleet = fl.demo_fleet(aws, groups={"web": 2})
    iam, ec2 = aws.client("iam"), aws.client("ec2")
    iam.create_role(RoleName="web", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []}))
    profile = iam.create_instance_profile(InstanceProfileName="web")["InstanceProfile"]
    iam.add_role_to_instance_profile(InstanceProfileName="web", RoleName="web")
    with_profile = fleet.groups["web"][0]
    ec2.associate_iam_instance_profile(IamInstanceProfile={"Arn": profile["Arn"]}, InstanceId=with_profile)
    data = listed(write_config(tmp_path, aws), aws)[0]
    arns = {v["instance_id"]: v["instance_profile_arn"] for v in hostvars(data).values()}
    assert arns == {with_profile: profile["Arn"], fleet.groups["web"][1]: None}


def test_metadata_options_host_vars_and_groups(aws, tmp_path):
    fleet = fl.demo_fleet(aws, groups={"web": 3})
    ec2 = aws.client("ec2")
    v2 = fleet.groups["web"][0]
    ec2.modify_instance_metadata_options(InstanceId=v2, HttpTokens="required", HttpPutResponseHopLimit=2,
                                         HttpEndpoint="enabled", InstanceMetadataTags="disabled")
    for fast_parser in (True, False):
        aws.proxy.reset()
        path = write_config(tmp_path, aws, fast_parser=fast_parser, keyed_groups=[
            {"key": "metadata_options.http_tokens", "prefix": "imds"},
            {"key": "'hops_' ~ metadata_options.http_put_response_hop_limit", "prefix": "imds"}])
        data = listed(path, aws)[0]
        by_id = {v["instance_id"]: (name, v) for name, v in hostvars(data).items()}
        name, variables = by_id[v2]
        assert variables["metadata_options"] == {"http_tokens": "required", "http_put_response_hop_limit": 2,
                                                 "http_endpoint": "enabled", "instance_metadata_tags": "disabled",
                                                 "imdsv1": False}
        v1_names = sorted(by_id[i][0] for i in fleet.groups["web"][1:])
        assert hosts_of(data, "imdsv1") == v1_names
        assert hosts_of(data, "imds_optional") == v1_names and hosts_of(data, "imds_required") == [name]
        assert hosts_of(data, "imds_hops_2") == [name] and hosts_of(data, "imds_hops_1") == v1_names
        # Read from the DescribeInstances answers the inventory makes anyway: no call more.
        assert aws.proxy.count("ec2", "DescribeInstances") == 1


@pytest.mark.compat
def test_standalone_instances_by_filters_and_hostnames(aws, tmp_path):
    fleet = fl.demo_fleet(aws, groups={"web": 2})
    path = write_config(tmp_path, aws, instance_filters=[{"tag:fleetkeeper:role": "bastion"}],
                        hostnames=["tag:Name", "private-ip-address"],
                        keyed_groups=[{"key": "ec2_tags['fleetkeeper:fleet'] | default('none')", "prefix": "fleet"}],
                        groups={"private": "public_ip_address is none"},
                        compose={"ansible_user": "'admin'"})
    data, proc = listed(path, aws)
    assert "WARNING" not in proc.stderr, proc.stderr
    assert hosts_of(data, "standalone") == ["bastion"]  # named by its Name tag
    private = [v["private_ip_address"] for v in hostvars(data).values() if v["instance_id"] != fleet.bastion_id]
    assert sorted(hostvars(data)) == sorted(["bastion"] + private)
    assert len(hosts_of(data, "fleet_web")) == 2 and hosts_of(data, "fleet_none") == ["bastion"]
    assert len(hosts_of(data, "private")) == 2
    assert all(v["ansible_user"] == "admin" for v in hostvars(data).values())


def test_duplicate_tag_hostnames_fall_through(aws, tmp_path):
    fleet = fl.demo_fleet(aws, groups={"web": 2})
    ec2 = aws.client("ec2")
    ec2.create_tags(Resources=fleet.groups["web"], Tags=[{"Key": "Name", "Value": "web"}])
    data = listed(write_config(tmp_path, aws, hostnames=["tag:Name"]), aws)[0]
    names = hosts_of(data, "asg_web")
    assert "web" in names and len(names) == 2 and len(set(names)) == 2


# --- failures --------------------------------------------------------------------------------

def failed(proc, *fragments):
    """The run failed and its error holds each fragment (ansible-core 2.18 wraps warnings at the terminal width)."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    flat = " ".join(proc.stderr.split())
    for fragment in fragments:
        assert fragment in flat, proc.stderr
    return proc.stderr


def test_missing_ec2_permission_fails_with_the_action_named(aws, tmp_path):
    fl.demo_fleet(aws, groups={"web": 1})
    aws.proxy.inject("deny", service="ec2", operation="DescribeInstances")
    failed(inventory(write_config(tmp_path, aws), aws=aws), "ec2:DescribeInstances", "UnauthorizedOperation",
           "docs/iam/inventory.json")


def test_missing_autoscaling_permission_falls_back_to_the_asg_tag(aws, tmp_path):
    fleet = fl.demo_fleet(aws, groups={"web": 2})
    aws.proxy.inject("deny", service="autoscaling", operation="DescribeAutoScalingGroups")
    data, proc = listed(write_config(tmp_path, aws), aws)
    assert "autoscaling:DescribeAutoScalingGroups is denied" in proc.stderr
    assert sorted(v["instance_id"] for v in hostvars(data).values()) == sorted(fleet.groups["web"])
    assert len(hosts_of(data, "asg_web")) == 2
    assert all(v["lifecycle_state"] is None for v in hostvars(data).values())

    strict = write_config(tmp_path, aws, name="strict.fleet.yml", asg_tag_fallback=False)
    failed(inventory(strict, aws=aws), "autoscaling:DescribeAutoScalingGroups", "AccessDenied")


@pytest.mark.compat
def test_bad_region_is_a_clear_error(aws, tmp_path):
    proc = inventory(write_config(tmp_path, aws, regions=["us-east-1", "us-eest-1"]), aws=aws)
    failed(proc, "unknown AWS region name(s) 'us-eest-1'")
    assert aws.proxy.count() == 0, aws.proxy.summary()


def test_unreachable_endpoint_is_a_clear_error(aws, tmp_path):
    path = write_config(tmp_path, aws, endpoint_url="http://127.0.0.1:9", retry_max_attempts=2, connect_timeout=2)
    failed(inventory(path, aws=aws), "cannot reach the endpoint", "endpoint_url")


def test_dropped_connections_exhaust_retries_and_fail(aws, tmp_path):
    fl.demo_fleet(aws, groups={"web": 1})
    aws.proxy.inject("drop", service="ec2", operation="DescribeInstances")
    failed(inventory(write_config(tmp_path, aws, retry_max_attempts=2), aws=aws), "cannot reach the endpoint")


def test_throttling_is_retried(aws, tmp_path):
    fleet = fl.demo_fleet(aws, groups={"web": 2})
    aws.proxy.inject("throttle", service="ec2", operation="DescribeInstances", times=2)
    data, proc = listed(write_config(tmp_path, aws), aws)
    assert sorted(v["instance_id"] for v in hostvars(data).values()) == sorted(fleet.groups["web"])
    assert [c.injected for c in aws.proxy.calls("ec2", "DescribeInstances")] == ["throttle", "throttle", None]


@pytest.mark.compat
@pytest.mark.parametrize("options,message", [
    ({"hostnames": ["bogus"]}, "unknown hostnames entry 'bogus'"),
    ({"bastion": {"tag": "role=bastion", "address": "192.0.2.1"}}, "exactly one of tag"),
    ({"lifecycle_states": []}, "'lifecycle_states' must list at least one state"),
    ({"lifecycle_states": ["Inservice"]}, "'Inservice' (did you mean 'InService'?), which is not an Auto Scaling "
                                          "lifecycle state; valid states are 'all' or Pending, Pending:Wait"),
    ({"instance_filters": ["tag:Name=x"]}, "instance_filters"),
    ({"retry_mode": "sometimes"}, "retry_mode"),
])
def test_malformed_config_is_a_clear_error(aws, tmp_path, options, message):
    failed(inventory(write_config(tmp_path, aws, **options), aws=aws), message)
    assert aws.proxy.count() == 0, aws.proxy.summary()


@pytest.mark.compat
def test_failed_region_fails_the_run_unless_skipping_is_allowed(aws, tmp_path, two_regions):
    # Regions run one after the other (max_concurrency 1), so the first region's first call fails.
    options = {"regions": ["us-east-1", EU], "max_concurrency": 1, "retry_max_attempts": 1}
    aws.proxy.inject("error", service="autoscaling", times=1)
    failed(inventory(write_config(tmp_path, aws, **options), aws=aws), "region us-east-1", "InternalError")

    aws.proxy.inject("error", service="autoscaling", times=1)
    path = write_config(tmp_path, aws, name="skip.fleet.yml", skip_failed_regions=True, **options)
    data, proc = listed(path, aws)
    assert "skipping region us-east-1" in proc.stderr
    assert {v["region"] for v in hostvars(data).values()} == {EU}


def test_default_ansible_config_would_hide_the_failure_but_the_example_cfg_does_not(aws, tmp_path):
    path = write_config(tmp_path, aws, endpoint_url="http://127.0.0.1:9", retry_max_attempts=1, connect_timeout=1)
    lenient = inventory(path, "--graph", aws=aws, unparsed_failed=False)
    assert lenient.returncode == 0 and "cannot reach the endpoint" in lenient.stderr  # ansible-core's default
    strict = inventory(path, "--graph", aws=aws, unparsed_failed=False,
                       env={"ANSIBLE_CONFIG": os.path.join(REPO_ROOT, "examples", "ansible.cfg")})
    failed(strict, "cannot reach the endpoint")


# --- cache ---------------------------------------------------------------------------------------

@pytest.mark.compat
def test_cache_hit_makes_no_call_and_the_key_follows_options_and_identity(aws, tmp_path):
    fl.demo_fleet(aws, groups={"web": 2})
    cache = {"cache": True, "cache_plugin": "ansible.builtin.jsonfile", "cache_connection": str(tmp_path / "cache")}
    path = write_config(tmp_path, aws, **cache)
    first = listed(path, aws)[0]
    calls = aws.proxy.count()
    assert calls > 0
    second, proc = listed(path, aws)
    assert aws.proxy.count() == calls, "a cache hit must not call AWS"
    assert second == first
    assert "WARNING" not in proc.stderr

    other = write_config(tmp_path, aws, lifecycle_states=["InService", "Standby"], **cache)
    listed(other, aws)
    assert aws.proxy.count() > calls, "changed options must not read the old cache"
    calls = aws.proxy.count()
    listed(path, aws, env={"AWS_ACCESS_KEY_ID": "AKIAOTHERCALLER0000"})
    assert aws.proxy.count() > calls, "another identity must not read the old cache"


def test_skipped_region_results_are_not_cached(aws, tmp_path, two_regions):
    options = {"regions": ["us-east-1", EU], "max_concurrency": 1, "retry_max_attempts": 1, "skip_failed_regions": True,
               "cache": True, "cache_plugin": "ansible.builtin.jsonfile", "cache_connection": str(tmp_path / "cache")}
    path = write_config(tmp_path, aws, **options)
    aws.proxy.inject("error", service="autoscaling", times=1)
    partial = listed(path, aws)[0]
    assert {v["region"] for v in hostvars(partial).values()} == {EU}
    whole, proc = listed(path, aws)
    assert {v["region"] for v in hostvars(whole).values()} == {"us-east-1", EU}
    assert "skipping" not in proc.stderr


# --- least privilege ---------------------------------------------------------------------------

def test_least_privilege_policy_allows_every_call_the_plugin_makes(aws, tmp_path, two_regions):
    with open(os.path.join(REPO_ROOT, "docs", "iam", "inventory.json"), encoding="utf-8") as handle:
        policy = json.load(handle)
    allowed = {action for statement in policy["Statement"] if statement["Effect"] == "Allow"
               for action in statement["Action"]}
    path = write_config(tmp_path, aws, regions=["us-east-1", EU],
                        bastion={"tag": "fleetkeeper:role=bastion", "user": "admin"},
                        instance_filters=[{"instance-type": "t3.micro"}])
    listed(path, aws)
    made = set(aws.proxy.summary())
    assert made, "the plugin made no call"
    assert made <= allowed, f"not allowed by docs/iam/inventory.json: {sorted(made - allowed)}"
    assert all(action.split(":")[1].startswith("Describe") for action in allowed), "read-only"


@pytest.mark.compat
def test_verify_file_accepts_fleet_yml_and_fleet_yaml(aws, tmp_path):
    fl.demo_fleet(aws, groups={"web": 1})
    good = write_config(tmp_path, aws, name="awx.fleet.yaml")
    data = listed(good, aws)[0]
    assert len(hosts_of(data, "asg_web")) == 1
    wrong = write_config(tmp_path, aws, name="awx.yml")
    proc = inventory(wrong, aws=aws)
    assert proc.returncode != 0
    assert "fleetkeeper.aws.fleet" not in proc.stdout

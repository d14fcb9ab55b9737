# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The ``fleetkeeper.aws.fleet`` inventory plugin: options, settings, cache, the fetch's plan, shaping and populating.

AWS is reached only through the gateway (plugin_utils/fleet_aws.py); the pure logic is plugin_utils/fleet.py,
what only makes it fast plugin_utils/fleet_fast.py.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: fleet
short_description: EC2 Auto Scaling fleets as an Ansible inventory
version_added: 0.1.0
author:
  - fleetkeeper maintainers (@fleetkeeper)
description:
  - Reads Auto Scaling groups (C(DescribeAutoScalingGroups), paginated, 100 per page) and their instances
    (C(DescribeInstances), up to 1,000 instance ids per call), optionally plus stand-alone instances selected
    by EC2 filters (one paginated call per filter set), in several regions at once.
  - Every host joins a group per Auto Scaling group (O(asg_group_prefix) plus the sanitised name), per
    availability zone (C(az_*)), per region (C(region_*), when several regions are read) and per lifecycle
    state (C(lifecycle_*)); hosts whose
    launch template version is not the one their group now launches also join C(launch_template_drift), and
    hosts whose instance metadata service still answers without a session token (IMDSv1) join C(imdsv1).
  - Host variables carry the ASG name, lifecycle and health status, availability zone, subnet, VPC, private
    and public addresses and DNS names, instance type, launch template id, name and version, the version the
    ASG now launches and whether they differ (C(launch_template_drift)), the instance profile ARN, the
    instance metadata options (C(metadata_options) with C(http_tokens), C(http_put_response_hop_limit),
    C(http_endpoint), C(instance_metadata_tags) and C(imdsv1); read from the same C(DescribeInstances)
    answers, no extra call) and the tags
    (C(ec2_tags)).
  - Failures never yield a partial inventory silently. Missing permissions, a region name AWS does not know,
    an endpoint that cannot be reached and a malformed file each raise an error naming the problem. With
    O(skip_failed_regions) a failed region is left out with one warning per region instead, and such a
    result is not cached.
  - ansible-core turns an inventory plugin's error into a warning and carries on with an empty inventory
    unless C([inventory] unparsed_is_failed = true) (or E(ANSIBLE_INVENTORY_UNPARSED_FAILED=true)) is set;
    set it so that a failed source fails the run. AWX sets it for inventory updates.
  - The inventory file must end with C(.fleet.yml) or C(.fleet.yaml).
notes:
  - The default cache TTL is O(cache_timeout) (3600 seconds). The cache key covers the file path, every
    effective option and the caller's identity (access key id or assumed role ARN, profile, endpoint), so
    changed options or credentials never read another configuration's cache. A cache hit makes no AWS call
    at all, not even O(assume_role_arn)'s C(AssumeRole).
  - When C(autoscaling:DescribeAutoScalingGroups) is denied and O(asg_tag_fallback) is on, instances are
    selected and grouped by their C(aws:autoscaling:groupName) tag, with a warning; lifecycle state, health
    and drift are then unknown (V(null)).
  - The least-privilege IAM policy is C(docs/iam/inventory.json) in the collection.
extends_documentation_fragment:
  - inventory_cache
  - constructed
  - amazon.aws.boto3
  - amazon.aws.common.plugins
  - amazon.aws.region.plugins
  - amazon.aws.assume_role.plugins
options:
  plugin:
    description: Marks the file as this plugin's configuration.
    required: true
    type: str
    choices: [fleetkeeper.aws.fleet]
  regions:
    description:
      - Regions to read, concurrently.
      - When empty, the single region from O(region) (or E(AWS_REGION) / the profile) is read.
    type: list
    elements: str
    default: []
  asg_names:
    description: Only these Auto Scaling groups (exact names). Empty means every group.
    type: list
    elements: str
    default: []
  asg_tags:
    description:
      - Only Auto Scaling groups carrying these tags, as a mapping of tag name to a value or a list of values.
    type: dict
    default: {}
  lifecycle_states:
    description:
      - ASG lifecycle states whose instances become hosts, for example V(InService), V(Standby),
        V(Pending:Wait), V(Terminating:Wait), V(Detaching).
      - V(all) keeps every instance whatever its state (terminated instances included).
      - A value that is not an Auto Scaling lifecycle state (the C(LifecycleState) values of the Auto Scaling API,
        spelled as there, such as V(InService)) fails the inventory with the list of valid states.
      - Hosts in V(Pending:Wait) also get C(lifecycle_hook_names) (the launch lifecycle hooks of their group, one
        C(DescribeLifecycleHooks) call per group holding such instances) and C(lifecycle_hook_name) when there is
        exactly one, for the C(fleetkeeper.aws.provision) playbook. The action token is not known to the
        inventory (only the hook's notification carries it).
    type: list
    elements: str
    default: [InService]
  instance_filters:
    description:
      - Also read stand-alone instances (in no selected ASG) matching EC2 DescribeInstances filters.
      - Each entry is a mapping of filters and costs one paginated call per region; an instance matching
        several entries is listed once. Without an C(instance-state-name) filter, pending, running, stopping
        and stopped instances are kept.
      - Such hosts join the C(standalone) group unless they carry an C(aws:autoscaling:groupName) tag.
    type: list
    elements: dict
    default: []
  hostnames:
    description:
      - Preference list for the inventory host name. Entries are V(dns-name) (public DNS name),
        V(ip-address) (public IP), V(private-ip-address), V(private-dns-name), V(instance-id) or
        V(tag:NAME).
      - The first entry with a value that no other host already has wins; when none does, the private IP
        address and then the instance id are used, so no host ever disappears for lack of a name.
    type: list
    elements: str
    default: [dns-name, private-ip-address, instance-id]
  asg_group_prefix:
    description: Prefix of the group made for each Auto Scaling group.
    type: str
    default: asg_
  bastion:
    description:
      - A bastion (jump host). Hosts without a public IP address get C(ansible_ssh_common_args) with
        C(-o ProxyJump=USER@BASTION); the bastion itself joins the C(bastion) group.
      - Name it by exactly one of O(bastion.tag), O(bastion.instance_id) or O(bastion.address).
    type: dict
    suboptions:
      tag:
        description:
          - C(KEY=VALUE) (or C(KEY)) of the running bastion instance. When several match, the first by
            instance id is used and all join the C(bastion) group.
        type: str
      instance_id:
        description: Instance id of the bastion.
        type: str
      address:
        description: Address (IP or DNS name) of a bastion outside this inventory.
        type: str
      user:
        description: SSH user on the bastion.
        type: str
      port:
        description: SSH port of the bastion.
        type: int
      region:
        description: Region of the bastion instance (default the first of O(regions)).
        type: str
      ssh_args:
        description: More SSH options appended to C(ansible_ssh_common_args).
        type: str
  max_concurrency:
    description: Threads for concurrent regions and concurrent C(DescribeInstances) batches.
    type: int
    default: 8
  retry_max_attempts:
    description:
      - Attempts per API call (the first one included) on throttling, server errors and dropped
        connections, with botocore's exponential backoff and jitter.
    type: int
    default: 10
  retry_mode:
    description: botocore retry mode; V(adaptive) also rate-limits the client after throttling.
    type: str
    choices: [standard, adaptive]
    default: standard
  connect_timeout:
    description: Seconds to wait for a connection to the endpoint.
    type: float
    default: 10
  read_timeout:
    description: Seconds to wait for an answer.
    type: float
    default: 60
  skip_failed_regions:
    description:
      - When a region cannot be read (for example an opt-in region the account has not enabled), leave it
        out with one warning per region instead of failing. The result is then not cached.
    type: bool
    default: false
  asg_tag_fallback:
    description:
      - When C(DescribeAutoScalingGroups) is denied, select instances by their C(aws:autoscaling:groupName)
        tag instead (with a warning). When off, the denial is an error.
    type: bool
    default: true
  fast_parser:
    description:
      - Read the large C(DescribeInstances) and C(DescribeAutoScalingGroups) answers with a small
        ElementTree reader that keeps only the fields this plugin uses, instead of botocore's generic parser
        (about 2 ms of CPU per instance). Error answers and anything unexpected still go to botocore.
      - Turn off to compare, or if an answer ever looks wrong.
    type: bool
    default: true
  asg_group_vars:
    description:
      - Set the variables that every host of an ASG group has with the same value (launch template, instance
        type, image, tags, metadata options, lifecycle state, ...) once on that ASG group instead of on each
        host. Playbooks, C(hostvars), C(ansible-inventory --host) and C(--list) see the same values, since a
        host's variables include its groups' ones; C(ansible-inventory --list --export), which AWX reads, and
        AWX's database hold them once per group, which cuts the export's time and memory by more than half at
        100,000 instances.
      - A host's own address and identity (C(ansible_host), C(instance_id), its IP addresses, DNS names and
        launch time) stay on the host, and only groups of two or more hosts that this source created are used.
      - As group variables, these values rank below host variables set elsewhere and may be overridden by
        another group's variable of the same name; turn off to keep every value on its host.
    type: bool
    default: true
    version_added: 0.1.0
  fast_host_vars:
    description:
      - On ansible-core 2.19 and later, put new hosts, their variables and their group memberships into the
        inventory in bulk instead of through the per-call inventory wrapper, whose C(set_variable) tags every
        string with its origin (the inventory file) and which cost most of the plugin's CPU time at 10,000
        hosts. The values are the same untrusted strings; the resulting inventory is the same.
      - Turn off to keep origin tags on every variable.
    type: bool
    default: true
  resolve_launch_template_versions:
    description:
      - Resolve C($Latest) and C($Default) launch template versions with C(DescribeLaunchTemplates)
        (one call per 1,000 templates and region, or per 200 if the endpoint refuses the larger batch) to report
        drift. When off, drift is only known for groups
        that pin a version number.
    type: bool
    default: true
"""

EXAMPLES = r"""
# fleet.fleet.yml: every InService instance of every ASG in two regions, cached for ten minutes.
plugin: fleetkeeper.aws.fleet
regions: [eu-west-1, eu-central-1]
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/ansible/fleet
cache_timeout: 600

---
# Only the web fleet, Standby instances too, private hosts reached through a bastion found by tag.
plugin: fleetkeeper.aws.fleet
regions: [us-east-1]
asg_tags:
  fleetkeeper:fleet: web
lifecycle_states: [InService, Standby]
hostnames: [tag:Name, private-ip-address]
bastion:
  tag: fleetkeeper:role=bastion
  user: admin
keyed_groups:
  - key: ec2_tags.Environment | default('none')
    prefix: env
  # imds_required / imds_optional, and hop limits (imds_hops_1, imds_hops_2) for the IMDSv2 migration
  - key: metadata_options.http_tokens
    prefix: imds
  - key: "'hops_' ~ metadata_options.http_put_response_hop_limit"
    prefix: imds
groups:
  outdated: launch_template_drift
compose:
  ansible_user: "'admin'"

---
# Assume a role, tune retries, keep going when an opt-in region is not enabled.
plugin: fleetkeeper.aws.fleet
regions: [us-east-1, ap-east-1]
assume_role_arn: arn:aws:iam::123456789012:role/inventory-reader
retry_max_attempts: 15
retry_mode: adaptive
skip_failed_regions: true
instance_filters:
  - tag:fleetkeeper:role: bastion
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin

from ansible_collections.amazon.aws.plugins.plugin_utils.botocore import get_aws_connection_info
from ansible_collections.amazon.aws.plugins.plugin_utils.inventory import AWSInventoryBase

from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import core_compat
from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import fleet as logic
from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import fleet_aws
from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import fleet_fast as fast

# Options that shape the query or the result: all of them are part of the cache key.
KEYED_OPTIONS = (
    "regions", "region", "asg_names", "asg_tags", "lifecycle_states", "instance_filters", "hostnames",
    "asg_group_prefix", "bastion", "asg_tag_fallback", "resolve_launch_template_versions", "fast_parser", "compose",
    "groups", "keyed_groups", "strict", "leading_separator", "use_extra_vars", "endpoint_url",
)
# Options the fetch (_FleetReader) plans its calls with.
READER_OPTIONS = ("max_concurrency", "asg_tag_fallback", "resolve_launch_template_versions", "skip_failed_regions")
# Options of the AWS clients (fleet_aws.AwsSession.gateway).
CLIENT_OPTIONS = ("retry_max_attempts", "retry_mode", "connect_timeout", "read_timeout", "max_concurrency", "fast_parser")


class _RegionResult:
    __slots__ = ("region", "records", "warnings", "error", "fallback")

    def __init__(self, region):
        self.region = region
        self.records = []
        self.warnings = []
        self.error = None
        self.fallback = False


class _FleetReader:
    """The fetch: which AWS reads to make, concurrently, through the gateway (fleet_aws.py), and their records.

    Regions are read side by side (``fleet-region`` threads); within a region, the stand-alone filters,
    the launch template and hook lookups and the DescribeInstances batches run on the ``fleet-call``
    threads. Each batch becomes records in the worker that read it: botocore's parsed instances (about
    15 KB each in Python) then live one batch per worker at a time, not the whole region's at once
    (1.5 GB at 100,000 instances)."""

    def __init__(self, gateway, options, name, warn):
        self.aws = gateway
        self.options = options  # READER_OPTIONS
        self.name = name
        self.warn = warn

    def read(self, settings, bastion_region):
        """{"regions": {region: records}, "warnings": [...], "bastion": records or None, "complete": bool}.

        A failed region fails the inventory (AnsibleParserError) or, with skip_failed_regions, is left out
        with a warning and ``complete`` false."""
        data, failures = self._read(settings, bastion_region)
        if failures and not self.options["skip_failed_regions"]:
            raise AnsibleParserError(f"{self.name}: " + "; ".join(str(f) for f in failures))
        for failure in failures:
            data["complete"] = False
            self.warn(f"{self.name}: skipping region {failure.region}: {failure}")
        bastion = settings["bastion"]
        if bastion and not bastion["address"] and not data["bastion"] and not any(f.region == bastion_region for f in failures):
            raise AnsibleParserError(f"{self.name}: {logic.bastion_missing(bastion, bastion_region)}")
        return data

    def _read(self, settings, bastion_region):
        regions = settings["regions"]
        bastion = settings["bastion"]
        workers = int(self.options["max_concurrency"])
        data = {"regions": {}, "warnings": [], "bastion": None, "complete": True}
        failures = []
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleet-call") as calls, \
                ThreadPoolExecutor(max_workers=min(workers, len(regions) + 1), thread_name_prefix="fleet-region") as pool:
            bastion_future = None
            if bastion and not bastion["address"]:
                bastion_future = pool.submit(self._fetch_bastion, bastion_region, bastion)
            futures = [pool.submit(self._fetch_region, region, settings, calls) for region in regions]
            for future in futures:
                result = future.result()
                if result.error is not None:
                    failures.append(result.error)
                    continue
                data["regions"][result.region] = result.records
                data["warnings"].extend(result.warnings)
            if bastion_future is not None:
                try:
                    data["bastion"] = bastion_future.result()
                except logic.FleetRegionError as exc:
                    failures.append(exc)
        return data, failures

    def _fetch_region(self, region, settings, calls):
        """One region's records: its ASGs' instances (or, when DescribeAutoScalingGroups is denied, those with the
        ASG tag), then the stand-alone instances of ``instance_filters`` not already among them."""
        result = _RegionResult(region)
        try:
            standalone = [calls.submit(self.aws.instances_by_filters, region, f) for f in settings["instance_filters"]]
            groups = self._groups(region, settings["asg_request"], result)
            if groups is None:
                for instance in self.aws.instances_by_filters(region, self._fallback_filters(settings["asg_request"])):
                    result.records.append(logic.instance_record(instance, region))
            else:
                self._member_records(region, groups, settings["lifecycle_states"], calls, result)
            seen = {r["instance_id"] for r in result.records}
            for future in standalone:
                for instance in future.result():
                    if instance["InstanceId"] not in seen:
                        seen.add(instance["InstanceId"])
                        result.records.append(logic.instance_record(instance, region))
        except logic.FleetRegionError as exc:
            result.error = exc
        return result

    def _groups(self, region, request, result):
        """The region's ASG summaries, or None when DescribeAutoScalingGroups is denied and asg_tag_fallback is on."""
        try:
            return [logic.asg_summary(group) for group in self.aws.auto_scaling_groups(region, request)]
        except logic.FleetRegionError as exc:
            if exc.kind != "denied" or not self.options["asg_tag_fallback"]:
                raise
            result.fallback = True
            result.warnings.append(
                f"{self.name}: region {region}: autoscaling:DescribeAutoScalingGroups is denied ({exc.code}); "
                f"selecting instances by their {logic.ASG_TAG} tag instead, so lifecycle state, health and "
                "launch template drift are unknown. Grant the permission (docs/iam/inventory.json) to get them."
            )
            return None

    @staticmethod
    def _fallback_filters(request):
        return logic.fallback_instance_filters(
            request.get("AutoScalingGroupNames"),
            {f["Name"][4:]: f["Values"] for f in request.get("Filters", ())},
        )

    def _member_records(self, region, groups, states, calls, result):
        """The records of the ASGs' instances, one DescribeInstances batch per ``fleet-call`` worker."""
        members = {}
        for group in groups:
            for instance_id, member in group["instances"].items():
                members[instance_id] = (group, member)
        # Launch template versions and hooks first (two calls at most, side by side), so that each
        # DescribeInstances batch becomes records in the worker that fetched it (see the class).
        template_ids = logic.templates_to_resolve(groups)
        versions_future = hooks_future = None
        if template_ids and self.options["resolve_launch_template_versions"]:
            versions_future = calls.submit(self._template_versions, region, template_ids)
        if states is None or "Pending:Wait" in states:
            waiting = sorted({g["name"] for g in groups
                              if any(m.get("lifecycle_state") == "Pending:Wait" for m in g["instances"].values())})
            if waiting:
                hooks_future = calls.submit(self.aws.launch_hooks, region, waiting)
        versions = versions_future.result() if versions_future else {}
        hooks = self._hooks(hooks_future.result(), result) if hooks_future else {}
        batches = [calls.submit(self._records_by_ids, region, batch, members, versions, hooks)
                   for batch in self.aws.instance_id_batches(members)]
        while batches:
            result.records.extend(batches.pop(0).result())

    def _template_versions(self, region, template_ids):
        return logic.template_versions(self.aws.launch_templates(region, template_ids))

    def _hooks(self, answer, result):
        hooks, denied_code = answer
        if denied_code is not None:
            result.warnings.append(f"{self.name}: autoscaling:DescribeLifecycleHooks is denied ({denied_code}): "
                                   "Pending:Wait hosts get no lifecycle_hook_name")
        return hooks

    def _records_by_ids(self, region, ids, members, versions, hooks):
        """The records of one DescribeInstances batch of ASG members (the parsed answer is dropped here)."""
        records = []
        for instance in self.aws.instances_by_ids(region, ids):
            group, member = members[instance["InstanceId"]]
            record = logic.instance_record(instance, region, group, member, versions)
            if record["lifecycle_state"] == "Pending:Wait" and hooks.get(group["name"]):
                # The action's token is in the hook's notification only: no API returns it.
                record["lifecycle_hook_names"] = hooks[group["name"]]
                if len(hooks[group["name"]]) == 1:
                    record["lifecycle_hook_name"] = hooks[group["name"]][0]
            records.append(record)
        return records

    def _fetch_bastion(self, region, bastion):
        instances = self.aws.bastion_instances(region, bastion)
        return sorted((logic.instance_record(i, region) for i in instances), key=lambda r: r["instance_id"])


class InventoryModule(AWSInventoryBase):
    NAME = "fleetkeeper.aws.fleet"
    INVENTORY_FILE_SUFFIXES = (".fleet.yml", ".fleet.yaml")

    def __init__(self):
        super().__init__()
        self._session = None
        self._credentials_frozen = False

    # --- configuration --------------------------------------------------------------------
    def set_options(self, task_keys=None, var_options=None, direct=None):
        """On ansible-core 2.18 a set AWS_SECURITY_TOKEN (AWX sets it) would fail the parse (plugin_utils/core_compat.py)."""
        if not core_compat.DATED_DEPRECATIONS_BREAK_CORE:
            return super().set_options(task_keys=task_keys, var_options=var_options, direct=direct)
        return core_compat.set_plugin_options(self, self.display, task_keys=task_keys, var_options=var_options,
                                              direct=direct)

    def verify_file(self, path):
        """The base class checks the file and its suffix (INVENTORY_FILE_SUFFIXES); a file named just
        fleet.yml or fleet.yaml is taken too."""
        if os.path.basename(path) in ("fleet.yml", "fleet.yaml"):
            return BaseInventoryPlugin.verify_file(self, path)
        return super().verify_file(path)

    @staticmethod
    def _sanitize_group_name(name):
        # keyed_groups and groups from Constructable: always transform, never warn.
        return logic.safe_group_name(name)

    def _set_frozen_credentials(self):
        # Deferred: AssumeRole is called only when AWS is actually queried, never on a cache hit.
        return None

    def _settings(self):
        try:
            regions = self.get_option("regions") or ([self.region] if self.region else [])
            settings = {
                # The shape of each name now; botocore's list of regions is checked before any call (_fetch).
                "regions": logic.validate_regions(regions),
                "hostnames": logic.validate_hostnames(self.get_option("hostnames")),
                "lifecycle_states": logic.validate_lifecycle_states(self.get_option("lifecycle_states")),
                "bastion": logic.parse_bastion(self.get_option("bastion")),
                "asg_request": logic.asg_request(self.get_option("asg_names"), self.get_option("asg_tags")),
                "instance_filters": [logic.ec2_filter_list(f) for f in self.get_option("instance_filters") or []],
            }
            if settings["bastion"] and settings["bastion"]["region"]:
                logic.validate_regions([settings["bastion"]["region"]])
        except logic.FleetConfigError as exc:
            raise AnsibleParserError(f"{self.NAME}: {exc}") from None
        for name in ("max_concurrency", "retry_max_attempts"):
            if int(self.get_option(name)) < 1:
                raise AnsibleParserError(f"{self.NAME}: '{name}' must be at least 1")
        return settings

    def _cache_key(self, path):
        options = {name: self.get_option(name) for name in KEYED_OPTIONS}
        # Who is asking, without an API call or a boto3 session: role to assume, access key id, profile.
        identity = {
            "role": self.get_option("assume_role_arn"),
            "access_key": self.get_option("access_key") or os.environ.get("AWS_ACCESS_KEY_ID"),
            "profile": self.get_option("profile") or os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE"),
        }
        return logic.cache_key(self.NAME, os.path.realpath(path), options, identity)

    # --- AWS (the gateway, plugin_utils/fleet_aws.py) ---------------------------------------
    def _aws(self):
        """One boto3 session for the whole run (fleet_aws.AwsSession)."""
        if self._session is None:
            self._session = fleet_aws.AwsSession(self.get_option("profile"))
        return self._session

    def _gateway(self, regions):
        """The gateway for ``regions`` (checked against botocore's list first), clients from one boto3 session."""
        try:
            logic.validate_regions(regions, self._aws().known_regions())
            if not self._credentials_frozen:  # AssumeRole here, when AWS is queried: never on a cache hit
                self._credentials_frozen = True
                if self.get_option("assume_role_arn"):
                    self._freeze_iam_role(self.get_option("assume_role_arn"))
            _region, endpoint_url, params = get_aws_connection_info(self)
            options = {name: self.get_option(name) for name in CLIENT_OPTIONS}
            return self._aws().gateway(regions, endpoint_url, {**params, **self._frozen_credentials}, options,
                                       log=lambda message: self.display.vvv(f"{self.NAME}: {message}"))
        except logic.FleetConfigError as exc:
            raise AnsibleParserError(f"{self.NAME}: {exc}") from None

    def _fetch(self, settings):
        """The records of every region and of the bastion, read through the gateway (_FleetReader)."""
        bastion_region, client_regions = logic.bastion_region(settings["regions"], settings["bastion"])
        gateway = self._gateway(client_regions)
        options = {name: self.get_option(name) for name in READER_OPTIONS}
        return _FleetReader(gateway, options, self.NAME, self.warn).read(settings, bastion_region)

    # --- inventory --------------------------------------------------------------------------
    def _shape(self, data, settings):
        """The hosts the inventory gets, in order: [name, groups, variables] each.

        Everything here follows from the data and the options in the cache key, so the cache keeps this
        result: a cache hit only has to put the hosts into the inventory."""
        hostnames = settings["hostnames"]
        states = settings["lifecycle_states"]
        prefix = self.get_option("asg_group_prefix")
        bastion = settings["bastion"]
        bastion_records = (data.get("bastion") or []) if bastion and not bastion["address"] else []
        bastion_args = logic.bastion_connection(bastion, bastion_records)
        bastion_ids = {r["instance_id"] for r in bastion_records}
        region_groups = len(data["regions"]) > 1
        taken = set()
        entries = []
        by_id = {}

        def add(record, groups, connect_args):
            index = by_id.get(record["instance_id"])
            if index is None:
                name = logic.choose_hostname(record, hostnames, taken)
                taken.add(name)
                by_id[record["instance_id"]] = len(entries)
                entries.append([name, groups, logic.host_vars(record, connect_args)])
            else:
                known = entries[index][1]
                known.extend(g for g in groups if g not in known)

        for record in bastion_records:
            add(record, ["bastion"], None)
        for region in sorted(data["regions"]):
            for record in sorted(data["regions"][region], key=lambda r: (r.get("asg_name") or "", r["instance_id"])):
                if not logic.keep_record(record, states):
                    continue
                groups = logic.builtin_groups(record, prefix, region_groups)
                if record["instance_id"] in bastion_ids:
                    groups.append("bastion")
                add(record, groups, None if record["instance_id"] in bastion_ids else bastion_args)
        return entries

    def _populate(self, entries):
        compose = self.get_option("compose")
        composed_groups = self.get_option("groups")
        keyed_groups = self.get_option("keyed_groups")
        strict = self.get_option("strict")
        shared = {}
        if self.get_option("asg_group_vars"):
            shared = logic.hoist_group_vars(entries, self.get_option("asg_group_prefix"),
                                            skip_groups=set(self.inventory.groups))
        construct = None
        if compose or composed_groups or keyed_groups:
            # compose, groups and keyed_groups see each host's variables with its ASG group's shared ones.
            inherited = {name: shared[g] for name, groups, _vars in entries for g in groups if g in shared}

            def construct(name, variables):
                if name in inherited:
                    variables = {**inherited[name], **variables}
                self._set_composite_vars(compose, variables, name, strict=strict)
                self._add_host_to_composed_groups(composed_groups, variables, name, strict=strict)
                self._add_host_to_keyed_groups(keyed_groups, variables, name, strict=strict)
        fast.add_hosts(self.inventory, entries, bulk=self.get_option("fast_host_vars"), each=construct)
        for group, variables in shared.items():
            for key, value in variables.items():
                self.inventory.set_variable(group, key, value)

    def _cached(self, key, cache):
        """The cached hosts for ``key``, or None (no cache, refresh asked for, expired or unreadable)."""
        if key is None or not cache:
            return None
        try:
            return fast.unpack(self._cache[key])
        except KeyError:
            return None

    def parse(self, inventory, loader, path, cache=True):
        """Settings, cache, fetch (AWS), shape (hosts, groups, variables), populate; cache the shaped hosts."""
        with fast.gc_paused():
            started = time.monotonic(), time.process_time()
            super().parse(inventory, loader, path, cache=cache)
            settings = self._settings()
            key = self._cache_key(path) if self.get_option("cache") else None
            data = self._cached(key, cache)
            fetched = data is None
            if fetched:
                raw = self._fetch(settings)
                data = {"hosts": self._shape(raw, settings), "warnings": raw["warnings"], "complete": raw["complete"]}
                del raw  # the records became the hosts' variables
            read = time.monotonic(), time.process_time()
            for warning in data.get("warnings", ()):
                self.warn(warning)
            # Cached before populating: the hosts' variables dicts become the inventory's own.
            if key is not None and fetched and data["complete"]:
                self._cache[key] = fast.pack(data)
            self._populate(data["hosts"])
            done = time.monotonic(), time.process_time()
        self.display.vvv(
            f"{self.NAME}: {len(data['hosts'])} hosts "
            f"{'read from AWS' if fetched else 'from cache'} in {read[0] - started[0]:.2f}s "
            f"(CPU {read[1] - started[1]:.2f}s), inventory built in {done[0] - read[0]:.2f}s (CPU {done[1] - read[1]:.2f}s)"
        )

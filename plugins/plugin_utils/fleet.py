# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Pure logic of the ``fleetkeeper.aws.fleet`` inventory plugin (controller only).

Nothing here talks to AWS or to Ansible: functions take the plain dictionaries
botocore returns and the plugin's options, and return plain, JSON-serialisable
values. The AWS calls are fleet_aws.py's (the gateway); the plugin
(plugins/inventory/fleet.py) plans them, caches the records built here and hands
them to Ansible's inventory. What only makes it fast (XML reader, packed cache,
bulk insertion, GC pause) is in fleet_fast.py.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import re

from ansible_collections.fleetkeeper.aws.plugins.plugin_utils.fleet_fast import CACHE_FORMAT

# Hard limits of the two APIs the plugin pages through.
ASG_PAGE_SIZE = 100  # DescribeAutoScalingGroups MaxRecords maximum
INSTANCE_BATCH_SIZE = 1000  # instance ids per DescribeInstances call
INSTANCE_PAGE_SIZE = 1000  # DescribeInstances MaxResults maximum (filter calls)
TEMPLATE_BATCH_SIZE = 1000  # launch template ids per DescribeLaunchTemplates call (as many as instance ids)
TEMPLATE_FALLBACK_BATCH_SIZE = 200  # its documented page size, used if an endpoint refuses the larger batch

ASG_TAG = "aws:autoscaling:groupName"
IN_SERVICE = "InService"
ALL_STATES = "all"
# Auto Scaling's lifecycle states (the LifecycleState enum of botocore's autoscaling model; a unit test keeps
# them equal). A selection outside them would match no instance, so it fails instead.
LIFECYCLE_STATES = (
    "Pending", "Pending:Wait", "Pending:Proceed", "Quarantined", "InService", "Terminating", "Terminating:Wait",
    "Terminating:Proceed", "Terminating:Retained", "Terminated", "Detaching", "Detached", "EnteringStandby", "Standby",
    "ReplacingRootVolume", "ReplacingRootVolume:Wait", "ReplacingRootVolume:Proceed", "RootVolumeReplaced",
    "Warmed:Pending", "Warmed:Pending:Wait", "Warmed:Pending:Proceed", "Warmed:Pending:Retained", "Warmed:Terminating",
    "Warmed:Terminating:Wait", "Warmed:Terminating:Proceed", "Warmed:Terminating:Retained", "Warmed:Terminated",
    "Warmed:Stopped", "Warmed:Running", "Warmed:Hibernated",
)
# Instance states kept when stand-alone instances are selected by filters without a state filter.
DEFAULT_INSTANCE_STATES = ["pending", "running", "stopping", "stopped"]

DEFAULT_HOSTNAMES = ["dns-name", "private-ip-address", "instance-id"]
# Hostname preferences and the record field each reads.
HOSTNAME_FIELDS = {
    "instance-id": "instance_id",
    "private-ip-address": "private_ip_address",
    "ip-address": "public_ip_address",
    "public-ip-address": "public_ip_address",
    "dns-name": "public_dns_name",
    "public-dns-name": "public_dns_name",
    "private-dns-name": "private_dns_name",
}
# What every host falls back to when no preference gives a (free) name.
FALLBACK_HOSTNAMES = ("private-ip-address", "instance-id")

_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_UNSAFE_GROUP_CHARS = re.compile(r"[^A-Za-z0-9_]")
_INSTANCE_ID_RE = re.compile(r"\bi-[0-9a-f]{8,17}\b")

# Error codes, by what the user has to do about them.
DENIED_CODES = frozenset((
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedAccess",
    "Forbidden", "403",
))
CREDENTIAL_CODES = frozenset((
    "AuthFailure", "OptInRequired", "InvalidClientTokenId", "UnrecognizedClientException",
    "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException", "RequestExpired",
    "InvalidAccessKeyId",
))


class FleetError(Exception):
    """Base class: the message says what went wrong and what to change."""


class FleetConfigError(FleetError):
    """The inventory file asks for something impossible or malformed."""


class FleetRegionError(FleetError):
    """A region could not be read completely; ``region`` names it."""

    def __init__(self, region, message, kind="error", code=""):
        super().__init__(message)
        self.region = region
        self.kind = kind
        self.code = code  # the AWS error code, when AWS answered with one


# --- configuration -------------------------------------------------------------

def validate_regions(regions, known=None):
    """Return ``regions`` without duplicates, or raise FleetConfigError naming the bad ones.

    ``known`` is the set of region names botocore knows (all partitions); a name
    it does not know is accepted only when it has the shape of a region name and
    ``known`` is empty (an unknown list).
    """
    if not regions:
        raise FleetConfigError(
            "no region to query: set 'regions' (a list) or 'region' in the inventory file, or AWS_REGION"
        )
    if not isinstance(regions, (list, tuple)):
        raise FleetConfigError(f"'regions' must be a list of region names, not {type(regions).__name__}")
    seen = []
    bad = []
    for region in regions:
        if not isinstance(region, str) or not _REGION_RE.match(region):
            bad.append(repr(region))
        elif known and region not in known:
            bad.append(repr(region))
        elif region not in seen:
            seen.append(region)
    if bad:
        raise FleetConfigError(
            f"unknown AWS region name(s) {', '.join(bad)} in 'regions': use names such as 'us-east-1' "
            "(if a region is new, upgrade botocore)"
        )
    return seen


def validate_hostnames(hostnames):
    """Check the ``hostnames`` preference list; returns it (or the default when empty)."""
    if not hostnames:
        return list(DEFAULT_HOSTNAMES)
    if not isinstance(hostnames, (list, tuple)):
        raise FleetConfigError("'hostnames' must be a list such as [dns-name, private-ip-address, instance-id]")
    for preference in hostnames:
        if not isinstance(preference, str):
            raise FleetConfigError(f"'hostnames' entries must be strings, not {preference!r}")
        if preference.startswith("tag:") and len(preference) > 4:
            continue
        if preference not in HOSTNAME_FIELDS:
            raise FleetConfigError(
                f"unknown hostnames entry {preference!r}: use tag:NAME or one of {', '.join(sorted(HOSTNAME_FIELDS))}"
            )
    return list(hostnames)


def validate_lifecycle_states(states):
    if not states:
        raise FleetConfigError("'lifecycle_states' must list at least one state (or 'all')")
    if not isinstance(states, (list, tuple)) or not all(isinstance(s, str) for s in states):
        raise FleetConfigError("'lifecycle_states' must be a list of strings such as [InService, Standby]")
    unknown = [state for state in states if state != ALL_STATES and state not in LIFECYCLE_STATES]
    if unknown:
        hints = []
        for state in unknown:
            near = [known for known in LIFECYCLE_STATES if known.lower() == state.lower()]
            hints.append(f"{state!r} (did you mean {near[0]!r}?)" if near else repr(state))
        raise FleetConfigError(
            f"'lifecycle_states' has {', '.join(hints)}, which is not an Auto Scaling lifecycle state; valid states "
            f"are {ALL_STATES!r} or {', '.join(LIFECYCLE_STATES)}")
    return None if ALL_STATES in states else frozenset(states)


def parse_bastion(bastion):
    """Normalise the ``bastion`` option into a dict, or None when not set."""
    if not bastion:
        return None
    if not isinstance(bastion, dict):
        raise FleetConfigError("'bastion' must be a mapping with one of tag, instance_id or address")
    selectors = [key for key in ("tag", "instance_id", "address") if bastion.get(key)]
    if len(selectors) != 1:
        raise FleetConfigError(
            "'bastion' needs exactly one of tag (KEY=VALUE), instance_id or address; got "
            + (", ".join(selectors) or "none")
        )
    result = {
        "tag": None, "instance_id": None, "address": None,
        "user": bastion.get("user"), "port": bastion.get("port"), "region": bastion.get("region"),
        "ssh_args": bastion.get("ssh_args") or "",
    }
    if bastion.get("tag"):
        tag = str(bastion["tag"])
        key, sep, value = tag.partition("=")
        if not key:
            raise FleetConfigError(f"bastion tag {tag!r} must look like KEY=VALUE or KEY")
        result["tag"] = (key, value if sep else None)
    elif bastion.get("instance_id"):
        if not _INSTANCE_ID_RE.fullmatch(str(bastion["instance_id"])):
            raise FleetConfigError(f"bastion instance_id {bastion['instance_id']!r} is not an instance id (i-...)")
        result["instance_id"] = str(bastion["instance_id"])
    else:
        result["address"] = str(bastion["address"])
    if result["port"] is not None:
        try:
            result["port"] = int(result["port"])
        except (TypeError, ValueError):
            raise FleetConfigError(f"bastion port {bastion.get('port')!r} is not a number") from None
        if not 0 < result["port"] < 65536:
            raise FleetConfigError(f"bastion port {result['port']} is out of range")
    return result


def bastion_filters(bastion):
    """EC2 filters that find the bastion named by tag or instance id (running only)."""
    filters = [{"Name": "instance-state-name", "Values": ["running"]}]
    if bastion["instance_id"]:
        filters.append({"Name": "instance-id", "Values": [bastion["instance_id"]]})
    else:
        key, value = bastion["tag"]
        if value is None:
            filters.append({"Name": "tag-key", "Values": [key]})
        else:
            filters.append({"Name": f"tag:{key}", "Values": [value]})
    return filters


def ec2_filter_list(filters):
    """An inventory-file filter mapping ({name: value or [values]}) as the EC2 API wants it."""
    if not isinstance(filters, dict):
        raise FleetConfigError(f"each entry of 'instance_filters' must be a mapping of EC2 filters, not {filters!r}")
    result = []
    for name, value in filters.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        result.append({"Name": str(name), "Values": [str(v) for v in values]})
    if not any(f["Name"] == "instance-state-name" for f in result):
        result.append({"Name": "instance-state-name", "Values": list(DEFAULT_INSTANCE_STATES)})
    return result


def asg_request(names, tags):
    """Keyword arguments of DescribeAutoScalingGroups for the selected ASG names and tags."""
    request = {"MaxRecords": ASG_PAGE_SIZE}
    if names:
        request["AutoScalingGroupNames"] = list(names)
    if tags:
        if not isinstance(tags, dict):
            raise FleetConfigError("'asg_tags' must be a mapping of tag names to a value or a list of values")
        request["Filters"] = [
            {"Name": f"tag:{key}", "Values": [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]}
            for key, value in tags.items()
        ]
    return request


def fallback_instance_filters(names, tags):
    """EC2 filters that stand in for DescribeAutoScalingGroups when it is denied.

    ASG tags propagate to instances only when PropagateAtLaunch is set, so tag
    filters are the closest approximation, and the plugin says so in a warning.
    """
    filters = [{"Name": "instance-state-name", "Values": list(DEFAULT_INSTANCE_STATES)}]
    if names:
        filters.append({"Name": f"tag:{ASG_TAG}", "Values": list(names)})
    else:
        filters.append({"Name": "tag-key", "Values": [ASG_TAG]})
    for key, value in (tags or {}).items():
        filters.append({"Name": f"tag:{key}", "Values": [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]})
    return filters


# --- API call planning -----------------------------------------------------------

def smaller_template_batch(size, code):
    """The batch size to retry a refused DescribeLaunchTemplates batch with, or None to give up.

    EC2 documents no limit on the number of LaunchTemplateId values (only a page size of 200 for
    unfiltered listings); should an endpoint refuse a large batch as an invalid request, the plugin
    falls back to that page size once instead of failing the inventory."""
    if size > TEMPLATE_FALLBACK_BATCH_SIZE and code in (
        "InvalidParameterValue", "InvalidParameterCombination", "InvalidRequest", "ValidationError",
    ):
        return TEMPLATE_FALLBACK_BATCH_SIZE
    return None


def missing_instance_ids(message):
    """Instance ids an InvalidInstanceID.NotFound message names."""
    return set(_INSTANCE_ID_RE.findall(message or ""))


def classify_error(code, status=None):
    """``denied`` (missing permission), ``credentials`` (refused or opt-in region) or ``error``."""
    if code in DENIED_CODES or status == 403 and code not in CREDENTIAL_CODES:
        return "denied"
    if code in CREDENTIAL_CODES:
        return "credentials"
    return "error"


def error_message(kind, region, action, code, detail):
    if kind == "denied":
        return (
            f"region {region}: the credentials in use may not call {action} ({code}: {detail}). "
            "Grant it (the least-privilege policy is in docs/iam/inventory.json) or use other credentials."
        )
    if kind == "credentials":
        return (
            f"region {region}: AWS refused the credentials for {action} ({code}: {detail}). "
            "Check the credentials; if the region is an opt-in region this account has not enabled, "
            "remove it from 'regions' or set 'skip_failed_regions: true'."
        )
    if kind == "unreachable":
        return (
            f"region {region}: cannot reach the endpoint for {action} ({detail}). "
            "Check 'endpoint_url', the network and any proxy settings."
        )
    return f"region {region}: {action} failed ({code}: {detail})"


# --- records -------------------------------------------------------------------------

def tag_dict(tags):
    return {t["Key"]: t.get("Value", "") for t in tags or ()}


def _iso(value):
    """A timestamp as ISO 8601 in UTC, whether botocore parsed it (datetime) or the fast reader kept the text."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
        except ValueError:
            return value
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc)
    return value.isoformat()


def asg_summary(group):
    """What the plugin keeps of one DescribeAutoScalingGroups entry."""
    spec = group.get("LaunchTemplate")
    if not spec:
        spec = (((group.get("MixedInstancesPolicy") or {}).get("LaunchTemplate") or {})
                .get("LaunchTemplateSpecification"))
    template = None
    if spec:
        template = {
            "id": spec.get("LaunchTemplateId"),
            "name": spec.get("LaunchTemplateName"),
            "version": spec.get("Version") or "$Default",
        }
    return {
        "name": group["AutoScalingGroupName"],
        "launch_template": template,
        "launch_configuration": group.get("LaunchConfigurationName"),
        "instances": {
            i["InstanceId"]: {
                "lifecycle_state": i.get("LifecycleState"),
                "health_status": i.get("HealthStatus"),
                "launch_template": i.get("LaunchTemplate"),
                "launch_configuration": i.get("LaunchConfigurationName"),
                "protected_from_scale_in": i.get("ProtectedFromScaleIn"),
            }
            for i in group.get("Instances") or ()
        },
    }


def templates_to_resolve(groups):
    """Launch template ids whose version an ASG names as $Latest or $Default."""
    ids = set()
    for group in groups:
        template = group["launch_template"]
        if template and template["id"] and not str(template["version"]).isdigit():
            ids.add(template["id"])
    return sorted(ids)


def template_versions(describe_launch_templates_entries):
    """{template id: {"latest": n, "default": n}} from DescribeLaunchTemplates entries."""
    return {
        t["LaunchTemplateId"]: {"latest": t.get("LatestVersionNumber"), "default": t.get("DefaultVersionNumber")}
        for t in describe_launch_templates_entries
    }


def target_version(template, versions):
    """The version number an ASG launches new instances with, or None if unknown."""
    if not template:
        return None
    version = str(template.get("version") or "$Default")
    if version.isdigit():
        return int(version)
    known = versions.get(template.get("id")) or {}
    number = known.get("latest" if version == "$Latest" else "default")
    return int(number) if number is not None else None


def drift(group, member, target):
    """Whether an instance runs something else than its ASG now launches (None: cannot tell)."""
    if group is None or member is None:
        return None
    template = group["launch_template"]
    if template:
        used = member.get("launch_template")
        if not used or target is None:
            return None
        if template.get("id") and used.get("LaunchTemplateId") and used["LaunchTemplateId"] != template["id"]:
            return True
        version = str(used.get("Version", ""))
        return not version.isdigit() or int(version) != target
    if group["launch_configuration"]:
        return member.get("launch_configuration") != group["launch_configuration"]
    return None


def metadata_options(instance):
    """The instance metadata options of a DescribeInstances item, as the host var ``metadata_options``.

    ``imdsv1`` is true when the metadata service answers without a session token (tokens optional and the
    endpoint enabled): the hosts the IMDSv2 migration still has to reach. None when EC2 did not say."""
    options = instance.get("MetadataOptions")
    if not options:
        return None
    tokens, endpoint = options.get("HttpTokens"), options.get("HttpEndpoint")
    return {
        "http_tokens": tokens,
        "http_put_response_hop_limit": options.get("HttpPutResponseHopLimit"),
        "http_endpoint": endpoint,
        "instance_metadata_tags": options.get("InstanceMetadataTags"),
        "imdsv1": tokens == "optional" and endpoint != "disabled",
    }


def instance_record(instance, region, group=None, member=None, versions=None):
    """The cached, JSON-serialisable facts about one instance; host vars are built from it."""
    tags = tag_dict(instance.get("Tags"))
    placement = instance.get("Placement") or {}
    profile = instance.get("IamInstanceProfile") or {}
    template = (group or {}).get("launch_template")
    used = (member or {}).get("launch_template") or {}
    target = target_version(template, versions or {}) if template else None
    state = (instance.get("State") or {}).get("Name")
    record = {
        "instance_id": instance["InstanceId"],
        "region": region,
        "asg_name": group["name"] if group else tags.get(ASG_TAG),
        "lifecycle_state": (member or {}).get("lifecycle_state"),
        "health_status": (member or {}).get("health_status"),
        "instance_state": state,
        "availability_zone": placement.get("AvailabilityZone"),
        "subnet_id": instance.get("SubnetId"),
        "vpc_id": instance.get("VpcId"),
        "private_ip_address": instance.get("PrivateIpAddress") or None,
        "public_ip_address": instance.get("PublicIpAddress") or None,
        "private_dns_name": instance.get("PrivateDnsName") or None,
        "public_dns_name": instance.get("PublicDnsName") or None,
        "instance_type": instance.get("InstanceType"),
        "image_id": instance.get("ImageId"),
        "launch_time": _iso(instance.get("LaunchTime")),
        "launch_template_id": used.get("LaunchTemplateId") or (template or {}).get("id"),
        "launch_template_name": used.get("LaunchTemplateName") or (template or {}).get("name"),
        "launch_template_version": int(used["Version"]) if str(used.get("Version", "")).isdigit() else None,
        "launch_template_target_version": target,
        "launch_template_drift": drift(group, member, target),
        "launch_configuration_name": (member or {}).get("launch_configuration"),
        "instance_profile_arn": profile.get("Arn"),
        "metadata_options": metadata_options(instance),
        "ec2_tags": tags,
    }
    if group is None and record["asg_name"] is None:
        record["standalone"] = True
    return record


def keep_record(record, lifecycle_states):
    """Whether a host belongs in the inventory under the lifecycle selection (None: all)."""
    if record.get("instance_state") in ("terminated", "shutting-down"):
        return lifecycle_states is None
    if lifecycle_states is None or record.get("standalone"):
        return True
    state = record.get("lifecycle_state")
    if state is None:  # tag fallback: lifecycle unknown, keep running instances
        return record.get("instance_state") == "running"
    return state in lifecycle_states


# --- inventory shaping -----------------------------------------------------------------

def safe_group_name(name):
    """A group name Ansible accepts without a warning (letters, digits, underscores)."""
    cleaned = _UNSAFE_GROUP_CHARS.sub("_", str(name))
    if not cleaned or cleaned[0].isdigit():
        cleaned = "_" + cleaned
    return cleaned


def builtin_groups(record, asg_prefix="asg_", region_groups=True):
    """Groups a host joins without any constructed options: ASG, AZ, region (when several), lifecycle, drift,
    IMDSv1 still answering."""
    return list(_builtin_groups(
        record.get("asg_name"), bool(record.get("standalone")), record.get("availability_zone"),
        record["region"] if region_groups else None, record.get("lifecycle_state"),
        bool(record.get("launch_template_drift")), asg_prefix,
        bool((record.get("metadata_options") or {}).get("imdsv1")),
    ))


@functools.lru_cache(maxsize=4096)
def _builtin_groups(asg_name, standalone, availability_zone, region, lifecycle_state, drift, asg_prefix,
                    imdsv1=False):
    # Memoised: a fleet has few distinct combinations, and each name is sanitised by a regex.
    groups = []
    if asg_name:
        groups.append(safe_group_name(asg_prefix + asg_name))
    elif standalone:
        groups.append("standalone")
    if availability_zone:
        groups.append(safe_group_name("az_" + availability_zone))
    if region is not None:
        groups.append(safe_group_name("region_" + region))
    if lifecycle_state:
        groups.append(safe_group_name("lifecycle_" + lifecycle_state.replace(":", "_").lower()))
    if drift:
        groups.append("launch_template_drift")
    if imdsv1:
        groups.append("imdsv1")
    return tuple(groups)


def _preferred(record, preference):
    if preference.startswith("tag:"):
        return (record.get("ec2_tags") or {}).get(preference[4:]) or None
    return record.get(HOSTNAME_FIELDS[preference])


def choose_hostname(record, preferences, taken=()):
    """The first preference with a value no other host has, then private IP, then instance id."""
    for preference in (*preferences, *FALLBACK_HOSTNAMES):
        value = _preferred(record, preference)
        if value and value not in taken:
            return str(value)
    return record["instance_id"]


def bastion_region(regions, bastion):
    """The bastion's region (its own, or the first of ``regions``) and every region the plugin needs clients for."""
    region = (bastion or {}).get("region") or regions[0]
    return region, list(regions) + ([region] if region not in regions else [])


def bastion_connection(bastion, records):
    """``ansible_ssh_common_args`` through the ``bastion`` (parse_bastion's) found as ``records``, or None."""
    if not bastion:
        return None
    address = bastion["address"] or (bastion_address(records[0]) if records else None)
    return proxy_jump_args(address, bastion["user"], bastion["port"], bastion["ssh_args"]) if address else None


def bastion_missing(bastion, region):
    """The error when the bastion's instance id or tag matches no running instance in ``region``."""
    what = f"instance {bastion['instance_id']}" if bastion["instance_id"] else "tag " + "=".join(
        v for v in bastion["tag"] if v is not None)
    return f"bastion {what} matches no running instance in {region}"


def bastion_address(record):
    return record.get("public_ip_address") or record.get("public_dns_name") or record.get("private_ip_address")


def proxy_jump_args(address, user=None, port=None, extra=""):
    """``ansible_ssh_common_args`` that reach a host through the bastion."""
    target = address if not user else f"{user}@{address}"
    if port and int(port) != 22:
        target = f"{target}:{int(port)}"
    args = f"-o ProxyJump={target}"
    return f"{args} {extra}".strip() if extra else args


def host_vars(record, bastion_args=None):
    """Host variables of one record (the record minus bookkeeping, plus connection vars).

    The record is taken over and becomes the variables (no copy: at 100,000 hosts a copy per host is
    about 130 MB), so the caller must not use it afterwards."""
    variables = record
    variables.pop("standalone", None)
    variables["ansible_host"] = record.get("public_ip_address") or record.get("private_ip_address") or record.get("instance_id")
    if bastion_args and not record.get("public_ip_address"):
        variables["ansible_ssh_common_args"] = bastion_args
    return variables


# --- variables shared by an ASG group ----------------------------------------------------

# Variables that say which host this is or how to reach it: always the host's own.
HOST_OWN_VARS = frozenset(("ansible_host", "instance_id", "private_ip_address", "public_ip_address",
                           "private_dns_name", "public_dns_name", "launch_time"))


def _same(one, other):
    """Equal and of the same type all the way down (1, 1.0 and True are three different values)."""
    if type(one) is not type(other):  # pylint: disable=unidiomatic-typecheck
        return False
    if isinstance(one, dict):
        return one.keys() == other.keys() and all(_same(v, other[k]) for k, v in one.items())
    if isinstance(one, list):
        return len(one) == len(other) and all(_same(a, b) for a, b in zip(one, other))
    return one == other


def hoist_group_vars(entries, asg_prefix="asg_", skip_groups=()):
    """Move the variables every host of an ASG group has with the same value onto that group, once.

    ``entries`` are the shaped hosts ([name, groups, variables] each); their variables dicts lose
    the moved keys. Returns {group name: variables}. Only groups of two or more hosts, only ASG
    groups (a host is in at most one, so no two of these groups compete for a host's variable),
    never the variables in HOST_OWN_VARS, and never a group in ``skip_groups`` (one the inventory
    held before this source: its other hosts must not inherit these variables). Playbooks see the
    same values: a host's variables include its groups' ones."""
    members, names = {}, {}
    for _name, _groups, variables in entries:
        asg = variables.get("asg_name")
        if not asg:
            continue
        group = names.get(asg)
        if group is None:
            group = names[asg] = safe_group_name(asg_prefix + asg)
        if group not in skip_groups:
            members.setdefault(group, []).append(variables)
    shared = {}
    for group, hosts in members.items():
        if len(hosts) < 2:
            continue
        first = hosts[0]
        common = {k: v for k, v in first.items() if k not in HOST_OWN_VARS}
        for variables in hosts[1:]:
            for key in [k for k, v in common.items() if k not in variables or not _same(variables[k], v)]:
                del common[key]
            if not common:
                break
        if common:
            shared[group] = common
            for variables in hosts:
                for key in common:
                    del variables[key]
    return shared


# --- cache key ------------------------------------------------------------------------

def cache_key(plugin_name, path, options, identity):
    """A cache key that changes with the inventory file, any effective option and the caller's identity."""
    blob = json.dumps([CACHE_FORMAT, path, options, identity], sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]
    return f"{plugin_name.replace('.', '_')}_{digest}"

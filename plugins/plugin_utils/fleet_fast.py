# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What makes the ``fleetkeeper.aws.fleet`` inventory fast, and nothing else.

Each call here has a plain equivalent that gives the same result, only slower; the
plugin works with any of them replaced by its equivalent, and
``tests/unit/plugins/plugin_utils/test_fleet_fast.py`` proves each pair gives the same result:

=================================  =====================================================
call                               plain equivalent
=================================  =====================================================
``install_xml_reader(client)``     botocore's own XML parser (option ``fast_parser``)
``pack(data)`` / ``unpack(entry)`` keeping ``data`` in the cache as it is
``add_hosts(inventory, entries)``  ``add_group``/``add_host``/``set_variable``/
                                   ``add_child`` per host (option ``fast_host_vars``)
``gc_paused()``                    leaving the garbage collector on
=================================  =====================================================

They are the parts of the plugin most exposed to changes in botocore and
ansible-core (botocore's ``before-parse`` event, ``InventoryData`` internals), kept
here so that the plugin reads as settings, cache, fetch, shape, populate.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gc
import json
import operator
import re
import zlib
from xml.etree import ElementTree

from ansible import constants as C
from ansible.inventory.host import Host
from ansible.utils.path import basedir

CACHE_FORMAT = 4
_ABSENT = "\x00absent"  # a key a record lacks, in the column-wise cache (AWS never returns NUL)


# --- GC pause ------------------------------------------------------------------------------

@contextlib.contextmanager
def gc_paused():
    """Run the block with the cyclic garbage collector off (restored after, whatever happens).

    The plugin makes tens of thousands of dicts and none of them forms a cycle: the
    collector's passes over a growing heap would cost more than the work itself."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


# --- bulk insertion ------------------------------------------------------------------------

def add_hosts(inventory, entries, bulk=True, each=None):
    """Put ``entries`` ([name, groups, variables] each) into ``inventory``; call ``each(name, variables)`` per host.

    ansible-core 2.19+ hands plugins a proxy of the inventory whose every call goes through wrapt
    and whose set_variable() walks each value to tag its strings with their origin: most of the
    plugin's CPU at 10,000 hosts. With ``bulk`` the hosts go into the proxied InventoryData
    directly, as add_host() and set_variable() would put them (same Host objects, same
    inventory_file and inventory_dir, plain untrusted strings from AWS that are never templated
    either way). Without ``bulk``, on older ansible-core, for localhost names and for hosts
    already in the inventory, the plain per-call API is used.

    In bulk, each entry's variables dict becomes its host's ``vars`` (one dict per host instead of
    two: about 130 MB at 100,000 hosts), so ``entries`` belong to the inventory afterwards."""
    data_obj = getattr(inventory, "__wrapped__", None) if bulk else None
    bulk = data_obj is not None and isinstance(getattr(data_obj, "hosts", None), dict)
    known_groups = set(inventory.groups)
    members = {}  # bulk: group name -> hosts, joined at the end
    origin_vars, all_hosts = {}, {}
    if bulk:
        source = data_obj.current_source
        origin_vars = {"inventory_file": source, "inventory_dir": basedir(source) if source else None}
        all_hosts = data_obj.hosts
    try:
        for name, groups, variables in entries:
            for group in groups:
                if group not in known_groups:
                    inventory.add_group(group)
                    known_groups.add(group)
            if bulk and name not in all_hosts and name not in C.LOCALHOST:
                host = Host(name)
                host.vars = variables  # taken over, not copied (see the docstring)
                host.vars.update(origin_vars)
                all_hosts[name] = host
                for group in groups:
                    hosts = members.get(group)
                    if hosts is None:
                        members[group] = [host]
                    else:
                        hosts.append(host)
            else:
                inventory.add_host(name)
                for key, value in variables.items():
                    inventory.set_variable(name, key, value)
                for group in groups:
                    inventory.add_child(group, name)
            if each is not None:
                each(name, variables)
    finally:
        if bulk:
            _join_groups(data_obj, members)


def _join_groups(data_obj, members):
    """Put hosts into groups as Group.add_host() would, one group at a time.

    Group.add_host() walks the group's ancestors twice per host (0.4 s at 10,000 hosts in three groups
    each); the groups this plugin fills have no parents yet, so the walk is done once per group."""
    for group_name, hosts in members.items():
        group = data_obj.groups[group_name]
        if group.parent_groups:
            for host in hosts:
                group.add_host(host)
            continue
        present = group.host_names
        for host in hosts:
            if host.name not in present:
                group.hosts.append(host)
                present.add(host.name)
                if group not in host.groups:
                    host.groups.append(group)
        group.clear_hosts_cache()
    data_obj._groups_dict_cache = {}  # pylint: disable=protected-access


# --- packed cache --------------------------------------------------------------------------

def _columns(records):
    """Records (dicts) as one key list and a row of values per record: about half the JSON to decode."""
    keys = sorted(set().union(*records))
    sparse = any(len(record) != len(keys) for record in records)
    if sparse or len(keys) < 2:
        rows = [[record.get(key, _ABSENT) for key in keys] for record in records]
    else:
        row = operator.itemgetter(*keys)
        rows = [row(record) for record in records]
    return {"keys": keys, "sparse": sparse, "rows": rows}


def _records(table):
    keys = table["keys"]
    if table.get("sparse"):
        return [{k: v for k, v in zip(keys, row) if v != _ABSENT} for row in table["rows"]]
    return [dict(zip(keys, row)) for row in table["rows"]]


def pack(data):
    """The cache entry: one ASCII string (base64 of zlib-compressed, column-wise JSON).

    ``data`` is what the inventory gets, ``{"hosts": [[name, groups, variables], ...], ...}``:
    a cache hit only puts the hosts into the inventory. ansible-core 2.19+'s cache plugins
    decode every string of a cached structure into a tagged object, and its jsonfile plugin
    wraps the value in one more JSON string: for 10,000 hosts a plain structure took longer
    to load than asking AWS, and a JSON string escaped twice still cost 0.3 s. A string
    without escapes costs nothing to either layer.
    """
    hosts = data["hosts"]
    index = {}
    packed = {key: value for key, value in data.items() if key != "hosts"}
    packed["names"] = [host[0] for host in hosts]
    packed["groups"] = [[index.setdefault(group, len(index)) for group in host[1]] for host in hosts]
    packed["group_names"] = list(index)
    packed["variables"] = _columns([host[2] for host in hosts])
    text = json.dumps(packed, separators=(",", ":"), check_circular=False).encode("utf-8")
    return {"format": CACHE_FORMAT, "data": base64.b64encode(zlib.compress(text, 1)).decode("ascii")}


def unpack(entry):
    """The data of a cache entry, or None when it is missing, of another format or damaged."""
    if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
        return None
    try:
        packed = json.loads(zlib.decompress(base64.b64decode(str(entry["data"]), validate=True)))
        group_names = packed.pop("group_names")
        groups = [[group_names[i] for i in indexes] for indexes in packed.pop("groups")]
        variables = _records(packed.pop("variables"))
        names = packed.pop("names")
        if not len(names) == len(groups) == len(variables):
            return None
        packed["hosts"] = [list(host) for host in zip(names, groups, variables)]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, zlib.error, binascii.Error):
        return None
    return packed


# --- fast answers ------------------------------------------------------------------------
# botocore's generic XML parser spends about 2 ms of CPU on each DescribeInstances item
# (4-5 KB of XML, four dateutil timestamps); the plugin needs a dozen fields of it. These
# functions read just those fields with ElementTree (C), in the shape botocore would give.
# The plugin hands them botocore's "before-parse" event; anything unexpected makes them
# return None and botocore parses the page as usual.

_INSTANCE_TEXT_FIELDS = {
    "instanceId": "InstanceId", "subnetId": "SubnetId", "vpcId": "VpcId",
    "privateIpAddress": "PrivateIpAddress", "ipAddress": "PublicIpAddress",
    "privateDnsName": "PrivateDnsName", "dnsName": "PublicDnsName", "instanceType": "InstanceType",
    "imageId": "ImageId", "launchTime": "LaunchTime",
}


# The metadata options the inventory reports (host var metadata_options).
_METADATA_FIELDS = {
    "httpTokens": "HttpTokens", "httpPutResponseHopLimit": "HttpPutResponseHopLimit",
    "httpEndpoint": "HttpEndpoint", "instanceMetadataTags": "InstanceMetadataTags",
}


def _namespace(root):
    return root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""


def _local(tag, cut):
    return tag[cut:]  # the tag without its namespace


# Parts of a DescribeInstances answer the inventory never reads, cut out before ElementTree builds
# elements for them (about three quarters of an item's XML): sub-trees, and text-only leaves that
# would each cost an element. None of the sub-trees nests inside itself, and XML text cannot contain
# "<", so the first closing tag after an opening one ends it; a leaf that is not text-only is kept.
_UNUSED_SUBTREES = re.compile(
    rb"<(reservationId|ownerId|requesterId|architecture|clientToken|ebsOptimized|enaSupport|hypervisor"
    rb"|rootDeviceName|rootDeviceType|sourceDestCheck|virtualizationType|bootMode|platformDetails|usageOperation"
    rb"|usageOperationUpdateTime|currentInstanceBootMode|code|reason|keyName|amiLaunchIndex|groupName|tenancy|id)>"
    rb"[^<]*</\1>"
    rb"|<(?:groupSet|productCodes|reason|keyName)/>"
    rb"|<(networkInterfaceSet|blockDeviceMapping|groupSet|privateDnsNameOptions|cpuOptions"
    rb"|capacityReservationSpecification|hibernationOptions|enclaveOptions|maintenanceOptions"
    rb"|networkPerformanceOptions|operator|monitoring|stateReason|productCodes|elasticGpuAssociationSet"
    rb"|elasticInferenceAcceleratorAssociationSet|licenseSet|ipv6AddressesSet)>.*?</\2>",
    re.S,
)


def parse_describe_instances(body, element_tree):
    """{"Reservations": [{"Instances": [...]}], "NextToken": ...} from a DescribeInstances answer."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    root = element_tree.fromstring(_UNUSED_SUBTREES.sub(b"", body))
    ns = _namespace(root)
    if _local(root.tag, len(ns)) != "DescribeInstancesResponse":
        return None
    reservations = []
    result = {"Reservations": reservations}
    token = root.find(ns + "nextToken")
    if token is not None and token.text:
        result["NextToken"] = token.text
    reservation_set = root.find(ns + "reservationSet")
    if reservation_set is None:
        return result
    tags = _InstanceTags(ns)
    for reservation in reservation_set:
        instances = []
        reservations.append({"Instances": instances})
        instances_set = reservation.find(tags.instances_set)
        for item in instances_set if instances_set is not None else ():
            instance = _read_instance(item, tags)
            if "InstanceId" not in instance:
                return None
            instances.append(instance)
    return result


class _InstanceTags:
    """The namespaced tags :func:`_read_instance` looks for, made once per answer."""

    def __init__(self, ns):
        self.text_fields = {ns + name: field for name, field in _INSTANCE_TEXT_FIELDS.items()}
        self.instances_set = ns + "instancesSet"
        self.state, self.placement = ns + "instanceState", ns + "placement"
        self.profile, self.tags = ns + "iamInstanceProfile", ns + "tagSet"
        self.name, self.az, self.arn = ns + "name", ns + "availabilityZone", ns + "arn"
        self.key, self.value = ns + "key", ns + "value"
        self.metadata = ns + "metadataOptions"
        self.metadata_fields = [(ns + name, field) for name, field in _METADATA_FIELDS.items()]
        self.children = (self.text_fields, self.state, self.placement, self.profile, self.tags, self.metadata)


def _read_instance(item, tags):
    """One ``instancesSet`` item as botocore would give its fields the plugin reads."""
    instance = {}
    text_fields, state_tag, placement_tag, profile_tag, tags_tag, metadata_tag = tags.children
    for child in item:
        tag = child.tag
        field = text_fields.get(tag)
        if field is not None:
            if child.text:
                instance[field] = child.text
        elif tag == state_tag:
            instance["State"] = {"Name": child.findtext(tags.name)}
        elif tag == placement_tag:
            instance["Placement"] = {"AvailabilityZone": child.findtext(tags.az)}
        elif tag == profile_tag:
            instance["IamInstanceProfile"] = {"Arn": child.findtext(tags.arn)}
        elif tag == tags_tag:
            instance["Tags"] = [{"Key": t.findtext(tags.key), "Value": t.findtext(tags.value) or ""} for t in child]
        elif tag == metadata_tag:
            options = {field: child.findtext(name) for name, field in tags.metadata_fields}
            hops = options["HttpPutResponseHopLimit"]
            options["HttpPutResponseHopLimit"] = int(hops) if hops and hops.isdigit() else None
            instance["MetadataOptions"] = options
    return instance


def _template_spec(node, ns):
    if node is None:
        return None
    return {
        "LaunchTemplateId": node.findtext(ns + "LaunchTemplateId"),
        "LaunchTemplateName": node.findtext(ns + "LaunchTemplateName"),
        "Version": node.findtext(ns + "Version"),
    }


def parse_describe_auto_scaling_groups(body, element_tree):
    """{"AutoScalingGroups": [...], "NextToken": ...} from a DescribeAutoScalingGroups answer."""
    root = element_tree.fromstring(body)
    ns = _namespace(root)
    if _local(root.tag, len(ns)) != "DescribeAutoScalingGroupsResponse":
        return None
    answer = root.find(ns + "DescribeAutoScalingGroupsResult")
    if answer is None:
        return None
    groups = []
    result = {"AutoScalingGroups": groups}
    token = answer.findtext(ns + "NextToken")
    if token:
        result["NextToken"] = token
    container = answer.find(ns + "AutoScalingGroups")
    for member in container if container is not None else ():
        group = {
            "AutoScalingGroupName": member.findtext(ns + "AutoScalingGroupName"),
            "LaunchConfigurationName": member.findtext(ns + "LaunchConfigurationName"),
            "LaunchTemplate": _template_spec(member.find(ns + "LaunchTemplate"), ns),
        }
        mixed = member.find(ns + "MixedInstancesPolicy")
        if mixed is not None:
            spec = _template_spec(mixed.find(f"{ns}LaunchTemplate/{ns}LaunchTemplateSpecification"), ns)
            group["MixedInstancesPolicy"] = {"LaunchTemplate": {"LaunchTemplateSpecification": spec}}
        instances = []
        for node in member.find(ns + "Instances") if member.find(ns + "Instances") is not None else ():
            instances.append({
                "InstanceId": node.findtext(ns + "InstanceId"),
                "LifecycleState": node.findtext(ns + "LifecycleState"),
                "HealthStatus": node.findtext(ns + "HealthStatus"),
                "LaunchConfigurationName": node.findtext(ns + "LaunchConfigurationName"),
                "LaunchTemplate": _template_spec(node.find(ns + "LaunchTemplate"), ns),
                "ProtectedFromScaleIn": node.findtext(ns + "ProtectedFromScaleIn") == "true",
            })
        group["Instances"] = instances
        if not group["AutoScalingGroupName"]:
            return None
        groups.append(group)
    return result


FAST_PARSERS = {
    "DescribeInstances": (
        parse_describe_instances,
        b'<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"></DescribeInstancesResponse>',
    ),
    "DescribeAutoScalingGroups": (
        parse_describe_auto_scaling_groups,
        b'<DescribeAutoScalingGroupsResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/">'
        b'<DescribeAutoScalingGroupsResult></DescribeAutoScalingGroupsResult></DescribeAutoScalingGroupsResponse>',
    ),
}


def _read_answer(operation_model=None, response_dict=None, customized_response_dict=None, **kwargs):
    """botocore "before-parse" hook: read the few fields the inventory needs from a large answer."""
    entry = FAST_PARSERS.get(getattr(operation_model, "name", None))
    if entry is None or customized_response_dict is None or (response_dict or {}).get("status_code") != 200:
        return
    parse, empty_answer = entry
    try:
        parsed = parse(response_dict["body"], ElementTree)
    except (ElementTree.ParseError, KeyError, TypeError, ValueError):
        return
    if parsed is not None:
        customized_response_dict.update(parsed)
        response_dict["body"] = empty_answer


def install_xml_reader(client):
    """Have ``client`` read DescribeInstances and DescribeAutoScalingGroups answers with the readers above."""
    client.meta.events.register("before-parse", _read_answer)

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet inventory's fast path (plugin_utils/fleet_fast.py) gives what its plain equivalent gives.

XML readers against botocore's parser, the packed cache against the data it packs, bulk insertion
against ansible-core's per-call inventory API, the GC pause against the collector's state.
(tests/integration/test_inventory_fleet.py compares whole inventories with fast_host_vars on and off.)"""

from __future__ import annotations

import gc
from xml.etree import ElementTree

import botocore.session
import pytest

from ansible.inventory.data import InventoryData

from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import fleet as logic
from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import fleet_fast as fast
from lab import replay

# fast_host_vars writes ansible-core's InventoryData directly: the compat stage runs it on the oldest core as well.
pytestmark = pytest.mark.compat


# --- fast parsers agree with botocore ----------------------------------------------------------------

def botocore_parse(operation, service, body):
    from botocore.parsers import create_parser

    model = botocore.session.get_session().get_service_model(service)
    return create_parser(model.protocol).parse({"body": body, "headers": {}, "status_code": 200},
                                               model.operation_model(operation).output_shape)


def test_fast_describe_instances_matches_botocore():
    fleet = replay.RegionFleet("us-east-1", 0, 5, 2)
    body = replay.INSTANCES_PAGE.format(request_id="r", items="".join(i.xml for i in fleet.order),
                                        next_token="<nextToken>5</nextToken>").encode()
    quick = fast.parse_describe_instances(body, ElementTree)
    slow = botocore_parse("DescribeInstances", "ec2", body)
    assert quick["NextToken"] == slow["NextToken"] == "5"
    fast_instances = [i for r in quick["Reservations"] for i in r["Instances"]]
    slow_instances = [i for r in slow["Reservations"] for i in r["Instances"]]
    assert len(fast_instances) == 5
    for fast_one, slow_one in zip(fast_instances, slow_instances):
        assert logic.instance_record(fast_one, "us-east-1") == logic.instance_record(slow_one, "us-east-1")
        assert fast_one["PrivateIpAddress"] == slow_one["PrivateIpAddress"]  # not the interface's copy
        assert logic.instance_record(fast_one, "us-east-1")["metadata_options"] == {
            "http_tokens": "required", "http_put_response_hop_limit": 2, "http_endpoint": "enabled",
            "instance_metadata_tags": "disabled", "imdsv1": False}


def test_fast_describe_auto_scaling_groups_matches_botocore():
    fleet = replay.RegionFleet("us-east-1", 0, 6, 2)
    body = replay.ASG_PAGE.format(groups="".join(fleet.group_xml.values()), next_token="<NextToken>2</NextToken>",
                                  request_id="r").encode()
    quick = fast.parse_describe_auto_scaling_groups(body, ElementTree)
    slow = botocore_parse("DescribeAutoScalingGroups", "autoscaling", body)
    assert quick["NextToken"] == slow["NextToken"] == "2"
    assert [logic.asg_summary(g) for g in quick["AutoScalingGroups"]] == \
        [logic.asg_summary(g) for g in slow["AutoScalingGroups"]]


def test_fast_parsers_refuse_what_they_do_not_know():
    assert fast.parse_describe_instances(b"<Other/>", ElementTree) is None
    assert fast.parse_describe_auto_scaling_groups(b"<Other/>", ElementTree) is None
    empty = fast.FAST_PARSERS["DescribeInstances"][1]
    assert botocore_parse("DescribeInstances", "ec2", empty).get("Reservations", []) == []
    empty = fast.FAST_PARSERS["DescribeAutoScalingGroups"][1]
    assert botocore_parse("DescribeAutoScalingGroups", "autoscaling", empty).get("AutoScalingGroups", []) == []


def test_cache_entries_round_trip_and_reject_damage():
    data = {"hosts": [["10.0.0.1", ["asg_web"], {"instance_id": "i-1"}]], "warnings": [], "complete": True}
    entry = fast.pack(data)
    assert isinstance(entry["data"], str)
    assert fast.unpack(entry) == data
    assert fast.unpack({"format": 0, "data": entry["data"]}) is None
    assert fast.unpack({"format": fast.CACHE_FORMAT, "data": "{not json"}) is None
    assert fast.unpack({"format": fast.CACHE_FORMAT, "data": entry["data"][:-8]}) is None
    assert fast.unpack(None) is None


def test_cache_entries_keep_hosts_exact_and_are_plain_ascii():
    hosts = [
        ["bastion", ["bastion"], {"instance_id": "i-1", "public_ip_address": "203.0.113.7",
                                  "ec2_tags": {"a": "\"quoted\" é"}}],
        ["10.0.0.2", ["asg_web", "az_us_east_1a", "bastion"], {"instance_id": "i-2", "public_ip_address": None,
                                                               "ansible_ssh_common_args": "-o ProxyJump=x"}],
        ["i-3", [], {"instance_id": "i-3", "ec2_tags": {}}],
    ]
    data = {"hosts": hosts, "warnings": ["w"], "complete": True}
    entry = fast.pack(data)
    assert entry["data"].isascii() and "\\" not in entry["data"] and '"' not in entry["data"]
    back = fast.unpack(entry)
    assert back == data
    assert "ansible_ssh_common_args" not in back["hosts"][0][2]
    assert fast.unpack(fast.pack({"hosts": [], "warnings": [], "complete": True}))["hosts"] == []


# --- bulk insertion agrees with the per-call API ----------------------------------------------------

class _Proxy:
    """What ansible-core 2.19+ hands a plugin: calls go to the InventoryData it wraps (``__wrapped__``)."""

    def __init__(self, data):
        self.__wrapped__ = data

    def __getattr__(self, name):
        return getattr(self.__wrapped__, name)


def _snapshot(data):
    hosts = {name: (sorted(g.name for g in host.groups), dict(host.vars)) for name, host in data.hosts.items()}
    # Members as sets: a host that takes the per-call path (localhost, or already in the inventory from
    # another source) joins its groups at once, the bulk hosts at the end, so only their order differs.
    groups = {name: (sorted(h.name for h in group.hosts), sorted(p.name for p in group.parent_groups))
              for name, group in data.groups.items()}
    return hosts, groups


ENTRIES = [
    ["203.0.113.7", ["bastion"], {"instance_id": "i-1", "ec2_tags": {"Name": "b"}}],
    ["10.0.0.2", ["asg_web", "az_us_east_1a", "bastion"], {"instance_id": "i-2", "ansible_ssh_common_args": "-o x"}],
    ["10.0.0.3", ["asg_web", "az_us_east_1a"], {"instance_id": "i-3", "launch_template_drift": True}],
    ["localhost", ["standalone"], {"instance_id": "i-4"}],  # never bulk: ansible-core treats it apart
    ["known", ["asg_web"], {"instance_id": "i-5"}],         # already in the inventory: never bulk
]


@pytest.mark.parametrize("parented", [False, True])
def test_bulk_insertion_builds_the_inventory_the_per_call_api_builds(parented):
    built, seen = {}, {}
    for bulk in (False, True):
        data = InventoryData()
        data.current_source = "/srv/inventory/prod.fleet.yml"
        data.add_host("known")
        if parented:  # a group with a parent takes Group.add_host()'s own path
            data.add_group("everything")
            data.add_group("asg_web")
            data.add_child("everything", "asg_web")
        calls = []
        fast.add_hosts(_Proxy(data), ENTRIES, bulk=bulk, each=lambda name, variables: calls.append(name))
        built[bulk], seen[bulk] = _snapshot(data), calls
    assert built[True] == built[False]
    assert seen[True] == seen[False] == [e[0] for e in ENTRIES]
    assert built[True][0]["10.0.0.2"][1]["inventory_file"] == "/srv/inventory/prod.fleet.yml"
    assert built[True][1]["az_us_east_1a"][0] == ["10.0.0.2", "10.0.0.3"]


def test_without_a_wrapped_inventory_the_per_call_api_is_used():
    data = InventoryData()
    fast.add_hosts(data, ENTRIES[:2])  # no __wrapped__: as on ansible-core 2.18
    assert sorted(data.hosts) == ["10.0.0.2", "203.0.113.7"]
    assert [h.name for h in data.groups["bastion"].hosts] == ["203.0.113.7", "10.0.0.2"]


# --- GC pause ------------------------------------------------------------------------------------------

def test_gc_pause_restores_the_collector_whatever_happens():
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with fast.gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with fast.gc_paused():
            pass
        assert not gc.isenabled()  # a collector the caller had off stays off
    finally:
        gc.enable()

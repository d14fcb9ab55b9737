# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pure part of the test-host harness: layout, addresses, names, rendering."""

from __future__ import annotations

import ipaddress
import shlex

import pytest

from lab.hosts import image as imagemod
from lab.hosts import topology as topo

SMOKE = [
    {"name": "bastion", "groups": ["bastions"],
     "networks": [{"name": "public", "address": "10.213.0.10"}, {"name": "private", "address": "10.0.2.10"}]},
    {"name": "private", "proxy_jump": "bastion", "networks": [{"name": "private", "address": "10.0.2.20"}]},
]
KEY = "/var/cache/fleetkeeper/runs/abc123/id_ed25519"
KNOWN = "/var/cache/fleetkeeper/runs/abc123/known_hosts"


def smoke(run_id="abc123", subnet="10.213.77.0/24"):
    return topo.build_topology(SMOKE, run_id, subnet)


def test_public_addresses_move_into_the_allocated_subnet_keeping_the_host_part():
    t = smoke()
    assert str(t.hosts["bastion"].address_on("public")) == "10.213.77.10"
    assert str(t.networks["public"].gateway) == "10.213.77.1"
    assert t.networks["public"].public


def test_the_controller_takes_the_last_public_address_and_no_private_one():
    t = smoke()
    assert str(t.networks["public"].controller_address) == "10.213.77.254"
    assert t.networks["private"].controller_address is None
    variables = topo.testhosts_vars(t, KEY, KNOWN, "/x")
    assert variables["testhosts_networks"]["public"]["controller_address"] == "10.213.77.254"
    assert variables["testhosts_networks"]["private"]["controller_address"] is None


def test_private_networks_keep_the_scenario_subnet():
    t = smoke()
    assert str(t.networks["private"].subnet) == "10.0.2.0/24"
    assert str(t.networks["private"].gateway) == "10.0.2.1"
    assert str(t.hosts["private"].address_on("private")) == "10.0.2.20"
    assert t.hosts["private"].address_on("public") is None


def test_ansible_host_is_public_address_or_the_one_shared_with_the_jump_host():
    t = smoke()
    assert t.ansible_host("bastion") == "10.213.77.10"
    assert t.ansible_host("private") == "10.0.2.20"


def test_service_address_is_the_gateway_of_the_first_network():
    t = smoke()
    assert t.service_address("bastion") == "10.213.77.1"
    assert t.service_address("private") == "10.0.2.1"


def test_names_carry_the_run_id_and_fit_kernel_limits():
    t = smoke(run_id="0f0f0f")
    assert t.namespaces() == ["fk-0f0f0f-n0", "fk-0f0f0f-n1", "fk-0f0f0f-h0", "fk-0f0f0f-h1"]
    assert t.root_links() == ["fk0f0f0fn0"]  # only the public network touches the root namespace
    many = [{"name": f"h{i}", "networks": [{"name": "public"}]} for i in range(50)]
    t = topo.build_topology(many, "ffffff", "10.213.1.0/24")
    assert all(len(link) <= 15 for link in t.root_links())
    assert all(len(topo.Topology.switch_port(h, 9)) <= 15 for h in t.hosts.values())


def test_interfaces_are_named_in_network_order():
    t = smoke()
    assert [(a.network, a.ifname) for a in t.hosts["bastion"].attachments] == [("public", "eth0"), ("private", "eth1")]


def test_public_addresses_are_assigned_when_missing():
    platforms = [{"name": "a"}, {"name": "b", "networks": [{"name": "public", "address": "10.9.9.10"}]},
                 {"name": "c", "networks": [{"name": "public", "address": "auto"}]}]
    t = topo.build_topology(platforms, "abcdef", "10.213.5.0/24")
    assert {n: str(t.hosts[n].address_on("public")) for n in "abc"} == {
        "a": "10.213.5.11", "b": "10.213.5.10", "c": "10.213.5.12"}


def test_prefix_other_than_24_is_honoured():
    platforms = [{"name": "a", "networks": [{"name": "public", "address": "192.168.0.130/25"}]}]
    assert topo.platforms_public_prefix(platforms) == 25
    t = topo.build_topology(platforms, "abcdef", "10.213.5.128/25")
    assert str(t.hosts["a"].address_on("public")) == "10.213.5.130"
    assert str(t.networks["public"].gateway) == "10.213.5.129"


@pytest.mark.parametrize("platforms, message", [
    ([], "no platforms"),
    ([{"name": "Bad_Name"}], "lowercase host name"),
    ([{"name": "a"}, {"name": "a"}], "listed twice"),
    ([{"name": "a", "networks": [{"name": "private", "address": "10.0.2.5"}]}], "not on the public network"),
    ([{"name": "a", "networks": [{"name": "private"}]}], "needs an address"),
    ([{"name": "a", "networks": [{"name": "public", "address": "10.213.0.1"}]}], "belongs to the harness"),
    ([{"name": "a", "networks": [{"name": "public", "address": "10.213.0.254"}]}], "belongs to the harness"),
    ([{"name": "a", "networks": [{"name": "public"}]},
      {"name": "b", "networks": [{"name": "x", "address": "10.9.0.1"}], "proxy_jump": "a"}], "belongs to the harness"),
    ([{"name": "a", "networks": [{"name": "public", "address": "10.213.0.255"}]}], "broadcast"),
    ([{"name": "a", "networks": [{"name": "public", "address": "not-an-ip"}]}], "not an IPv4 address"),
    ([{"name": "a", "networks": [{"name": "public", "address": "fd00::5"}]}], "IPv4"),
    ([{"name": "a", "networks": [{"name": "public", "address": "10.0.0.5/30"}]}], "between"),
    ([{"name": "a", "networks": [{"name": "public"}, {"name": "public"}]}], "listed twice"),
    ([{"name": "a", "networks": [{"name": "public", "address": "10.1.1.5"}]},
      {"name": "b", "networks": [{"name": "public", "address": "10.1.2.5"}]}], "not in 10.1.1.0/24"),
    ([{"name": "a", "networks": [{"name": "public", "address": "10.1.1.5"}]},
      {"name": "b", "networks": [{"name": "public", "address": "10.1.1.5"}]}], "used twice"),
    ([{"name": "a"}, {"name": "b", "proxy_jump": "nobody", "networks": [{"name": "p", "address": "10.0.0.5"}]}],
     "is not a platform"),
    ([{"name": "a", "networks": [{"name": "x", "address": "10.0.0.4"}], "proxy_jump": "b"},
      {"name": "b", "networks": [{"name": "y", "address": "10.0.1.4"}], "proxy_jump": "a"}], "must be on the public"),
    ([{"name": "a"}, {"name": "b", "proxy_jump": "a", "networks": [{"name": "p", "address": "10.0.0.5"}]}],
     "shares no network"),
    ([{"name": "a", "release": "buster"}], "release 'buster' is not one of bookworm, trixie"),
    ([{"name": "a", "net_admin": "yes"}], "net_admin must be true or false"),
])
def test_invalid_scenarios_are_refused_with_a_message_that_says_what_to_fix(platforms, message):
    with pytest.raises(topo.TopologyError, match=message):
        topo.build_topology(platforms, "abcdef", "10.213.0.0/24" if "/25" not in str(platforms) else "10.213.0.0/25")


def test_choose_public_subnet_avoids_used_networks_and_is_deterministic():
    used = [ipaddress.ip_network("10.213.0.0/17")]
    first = topo.choose_public_subnet("000000", used)
    assert first.subnet_of(ipaddress.ip_network("10.213.128.0/17")) and first.prefixlen == 24
    assert topo.choose_public_subnet("000000", used) == first
    # A route covering the whole pool leaves nothing
    with pytest.raises(topo.TopologyError, match="no free"):
        topo.choose_public_subnet("abcdef", ["10.0.0.0/8"])
    # Different run ids usually start at different places
    picks = {topo.choose_public_subnet(f"{i:06x}", []) for i in range(0, 2**24, 2**24 // 64)}
    assert len(picks) > 32


def test_choose_public_subnet_never_overlaps_whatever_is_used():
    used = []
    for i in range(256):
        subnet = topo.choose_public_subnet(f"{(i * 7919) % 2**24:06x}", used)
        assert not any(subnet.overlaps(u) for u in used)
        used.append(subnet)
    with pytest.raises(topo.TopologyError):
        topo.choose_public_subnet("123456", used)


def test_inventory_gives_every_host_connection_details_and_the_private_one_a_proxy_command():
    t = smoke()
    hosts = topo.inventory(t, KEY, KNOWN)["all"]["hosts"]
    assert set(hosts) == {"bastion", "private"}
    for name, host in hosts.items():
        assert host["ansible_user"] == "root"
        assert host["ansible_private_key_file"] == KEY
        assert host["ansible_host"] == t.ansible_host(name)
    bastion_args = shlex.split(hosts["bastion"]["ansible_ssh_common_args"])
    assert not any(a.startswith("ProxyCommand") for a in bastion_args)
    assert f"UserKnownHostsFile={KNOWN}" in bastion_args
    private_args = shlex.split(hosts["private"]["ansible_ssh_common_args"])
    proxy = [a for a in private_args if a.startswith("ProxyCommand=")]
    assert len(proxy) == 1
    words = shlex.split(proxy[0].split("=", 1)[1])
    assert words[0] == "ssh" and words[-1] == "root@10.213.77.10"
    assert ["-W", "%h:%p"] == words[words.index("-W"):words.index("-W") + 2]
    assert ["-i", KEY] == words[words.index("-i"):words.index("-i") + 2]


def test_ssh_control_sockets_are_kept_per_run():
    # The private host has the same address in every run: a shared ControlMaster
    # socket would lead into another run's host.
    hosts = topo.inventory(smoke(), KEY, KNOWN, "/runs/abc123/cp")["all"]["hosts"]
    assert {h["ansible_control_path_dir"] for h in hosts.values()} == {"/runs/abc123/cp"}
    assert "ansible_control_path_dir" not in topo.inventory(smoke(), KEY, KNOWN)["all"]["hosts"]["private"]


def test_paths_with_spaces_are_refused_rather_than_mis_quoted():
    with pytest.raises(topo.TopologyError, match="whitespace"):
        topo.inventory(smoke(), "/tmp/my key", KNOWN)


def test_instance_config_is_what_molecule_reads():
    assert topo.instance_config(smoke(), KEY) == [
        {"instance": "bastion", "address": "10.213.77.10", "user": "root", "port": 22, "identity_file": KEY},
        {"instance": "private", "address": "10.0.2.20", "user": "root", "port": 22, "identity_file": KEY},
    ]


def test_testhosts_vars_without_and_with_the_aws_endpoint():
    t = smoke()
    plain = topo.testhosts_vars(t, KEY, KNOWN, "/x/ssh_config")
    assert plain["testhosts_ssh_key"] == KEY
    assert plain["testhosts_gateways"] == {"public": "10.213.77.1", "private": "10.0.2.1"}
    assert plain["testhosts_addresses"]["bastion"] == {"public": "10.213.77.10", "private": "10.0.2.10"}
    assert plain["testhosts_networks"]["private"]["controller_reachable"] is False
    assert plain["testhosts_aws_endpoint"] is False
    assert "testhosts_aws_endpoint_url" not in plain
    assert plain["testhosts_hosts"]["private"]["apt_proxy_url"] == "http://10.0.2.1:3142"
    with_aws = topo.testhosts_vars(t, KEY, KNOWN, "/x/ssh_config", "http://127.0.0.1:40000")
    assert with_aws["testhosts_aws_endpoint_url"] == "http://127.0.0.1:40000"
    assert with_aws["testhosts_hosts"]["private"]["aws_endpoint_url"] == "http://10.0.2.1:4566"
    assert with_aws["testhosts_hosts"]["bastion"]["aws_endpoint_url"] == "http://10.213.77.1:4566"
    assert "inventory_hostname" in with_aws["testhosts_aws_endpoint_url_from_hosts"]


def test_etc_hosts_lists_only_hosts_on_a_shared_network():
    t = topo.build_topology(SMOKE + [{"name": "other", "networks": [{"name": "public", "address": "10.213.0.30"}]}],
                            "abcdef", "10.213.3.0/24")
    private = t.etc_hosts("private")
    assert "10.0.2.10\tbastion" in private and "other" not in private
    bastion = t.etc_hosts("bastion")
    assert "10.213.3.30\tother" in bastion and "10.0.2.20\tprivate" in bastion


def test_known_hosts_and_ssh_config():
    t = smoke()
    text = topo.known_hosts_lines(t, {"bastion": ["ssh-ed25519 AAAAB"], "private": ["ssh-ed25519 AAAAC"]})
    assert "10.213.77.10,10.0.2.10 ssh-ed25519 AAAAB\n" in text
    assert "10.0.2.20 ssh-ed25519 AAAAC\n" in text
    config = topo.ssh_config(t, KEY, KNOWN)
    assert "Host private\n  HostName 10.0.2.20" in config and "ProxyJump bastion" in config


def test_run_ids_are_validated():
    assert topo.validate_run_id("a1b2c3") == "a1b2c3"
    for bad in ("", "ABCDEF", "abc", "a1b2c3d", "../../x"):
        with pytest.raises(topo.TopologyError):
            topo.validate_run_id(bad)


def test_release_defaults_to_bookworm_and_is_given_to_ansible():
    t = topo.build_topology([SMOKE[0], dict(SMOKE[1], release="trixie")], "abc123", "10.213.77.0/24")
    assert t.hosts["bastion"].release == "bookworm"
    assert t.hosts["private"].release == "trixie"
    variables = topo.testhosts_vars(t, KEY, KNOWN, "/x")
    assert variables["testhosts_hosts"]["bastion"]["release"] == "bookworm"
    assert variables["testhosts_hosts"]["private"]["release"] == "trixie"
    assert not t.hosts["bastion"].net_admin
    assert topo.build_topology([dict(SMOKE[0], net_admin=True)], "abc123", "10.213.77.0/24").hosts["bastion"].net_admin


def test_each_release_has_its_own_image_and_bookworm_is_the_default():
    # The digest of the current bookworm recipe (it changed when the ask-password .path units were masked:
    # cached images of an older recipe are rebuilt once, never reused).
    assert imagemod.recipe_hash() == imagemod.recipe_hash("bookworm") == "e4bda3fc8959b7c1"
    assert imagemod.recipe_hash("trixie") != imagemod.recipe_hash("bookworm")
    assert imagemod.recipe("trixie")["suite"] == "trixie"
    script = imagemod.post_build("trixie")
    assert "trixie-security" in script and "bookworm" not in script
    assert imagemod.image_dir("/c", "trixie").endswith("/" + imagemod.recipe_hash("trixie"))
    with pytest.raises(ValueError, match="not one of"):
        imagemod.recipe_hash("sid")


def test_a_run_that_would_exhaust_roots_inotify_instances_is_refused_before_anything_is_made():
    from lab.hosts import launcher  # pylint: disable=import-outside-toplevel

    launcher.check_inotify_room(20, used=0, limit=128)  # 100 of 128
    launcher.check_inotify_room(21, used=20, limit=128)  # 125
    with pytest.raises(launcher.LaunchError) as refused:
        launcher.check_inotify_room(21, used=30, limit=128)
    assert "105 inotify instances" in str(refused.value) and "19 more host(s) fit" in str(refused.value)
    assert "fs.inotify.max_user_instances=128" in str(refused.value)
    assert launcher.inotify_in_use() >= 0

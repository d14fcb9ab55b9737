# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pure half of the test-host harness: read a scenario's platforms, lay out
networks, addresses and names for one run, and render what Ansible reads.

Nothing here touches the machine, so all of it is unit-tested
(tests/unit/lab/hosts/test_testhosts_topology.py). The launcher (``lab.hosts.launcher``)
turns a :class:`Topology` into namespaces, veths and containers.

Rules (also in docs/testhosts.md):

* Every network is a /24 unless an address says otherwise (``10.0.2.10/25``).
  Its gateway is the first usable address and belongs to the harness (the
  bridge in the network's switch namespace). On ``public`` the last usable
  address is the controller's (the root namespace's end of its veth).
* The network named ``public`` is the one the controller reaches. Its subnet is
  allocated per run from ``10.213.0.0/16`` so that concurrent runs never
  collide; a scenario's public address only gives the host part (``.10`` stays
  ``.10``). A host without a public ``address`` gets the next free host number
  from ``.10``.
* Any other network exists only inside namespaces the run created, so its
  subnet is taken literally from the scenario.
* A host without a public address needs ``proxy_jump: <host>``; that host must
  be on ``public`` and share a network with it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import shlex
from dataclasses import dataclass, field

from lab.hosts.image import DEFAULT_RELEASE, RELEASES

PUBLIC = "public"
PUBLIC_POOL = ipaddress.ip_network("10.213.0.0/16")
DEFAULT_PREFIX = 24
FIRST_AUTO_HOST = 10
SSH_PORT = 22
APT_PROXY_PORT = 3142
AWS_ENDPOINT_PORT = 4566

_HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_NET_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")
_RUN_ID = re.compile(r"^[0-9a-f]{6}$")


class TopologyError(ValueError):
    """The scenario's platforms cannot be laid out; the message says what to fix."""


@dataclass
class Network:
    name: str
    index: int
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    public: bool
    scenario_subnet: ipaddress.IPv4Network | None = None

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    @property
    def controller_address(self) -> ipaddress.IPv4Address | None:
        """The root namespace's address on the public network (the last usable one)."""
        return self.subnet.broadcast_address - 1 if self.public else None

    def reserved(self) -> set:
        return {self.gateway} | ({self.controller_address} if self.public else set())


@dataclass
class Attachment:
    network: str
    address: ipaddress.IPv4Address
    ifname: str


@dataclass
class Host:
    name: str
    index: int
    attachments: list = field(default_factory=list)
    proxy_jump: str | None = None
    groups: list = field(default_factory=list)
    release: str = DEFAULT_RELEASE
    net_admin: bool = False

    def address_on(self, network: str) -> ipaddress.IPv4Address | None:
        for attachment in self.attachments:
            if attachment.network == network:
                return attachment.address
        return None

    @property
    def first_network(self) -> str:
        return self.attachments[0].network


@dataclass
class Topology:
    run_id: str
    networks: dict
    hosts: dict

    # --- names of everything the run creates (all carry the run id) ---------
    def switch_ns(self, network: str) -> str:
        return f"fk-{self.run_id}-n{self.networks[network].index}"

    def host_ns(self, host: str) -> str:
        return f"fk-{self.run_id}-h{self.hosts[host].index}"

    def root_link(self, network: str) -> str:
        """The veth end left in the root namespace (public network only); at most 15 characters."""
        return f"fk{self.run_id}n{self.networks[network].index}"

    @staticmethod
    def switch_port(host: "Host", attachment_index: int) -> str:
        return f"h{host.index}e{attachment_index}"

    def namespaces(self) -> list:
        return [self.switch_ns(n) for n in self.networks] + [self.host_ns(h) for h in self.hosts]

    def root_links(self) -> list:
        return [self.root_link(n) for n, net in self.networks.items() if net.public]

    # --- addresses --------------------------------------------------------------
    def ansible_host(self, host: str) -> str:
        """The address Ansible connects to: public if any, else the one the jump host shares."""
        h = self.hosts[host]
        public = h.address_on(PUBLIC)
        if public is not None:
            return str(public)
        jump = self.hosts[h.proxy_jump]
        for attachment in h.attachments:
            if jump.address_on(attachment.network) is not None:
                return str(attachment.address)
        raise TopologyError(f"host {host!r} shares no network with its proxy_jump {h.proxy_jump!r}")

    def service_address(self, host: str) -> str:
        """Where a host reaches the harness's services (apt proxy, AWS endpoint, resolver):
        the gateway of its first network."""
        return str(self.networks[self.hosts[host].first_network].gateway)

    def etc_hosts(self, host: str) -> str:
        """/etc/hosts for one host: itself, then every other host it shares a network with."""
        lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{host}", "::1\tlocalhost ip6-localhost ip6-loopback",
                 "ff02::1\tip6-allnodes", "ff02::2\tip6-allrouters"]
        me = self.hosts[host]
        for other in self.hosts.values():
            if other.name == host:
                continue
            for attachment in me.attachments:
                address = other.address_on(attachment.network)
                if address is not None:
                    lines.append(f"{address}\t{other.name}")
                    break
        return "\n".join(lines) + "\n"


def _parse_address(value, where: str):
    """``10.0.2.10`` or ``10.0.2.10/24`` -> (address, network)."""
    text = str(value).strip()
    try:
        interface = ipaddress.ip_interface(text if "/" in text else f"{text}/{DEFAULT_PREFIX}")
    except ValueError as exc:
        raise TopologyError(f"{where}: {value!r} is not an IPv4 address: {exc}") from None
    if interface.version != 4:
        raise TopologyError(f"{where}: only IPv4 addresses are supported, not {value!r}")
    if not 16 <= interface.network.prefixlen <= 29:
        raise TopologyError(f"{where}: prefix /{interface.network.prefixlen} is not between /16 and /29")
    return interface.ip, interface.network


def run_id_for(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:6]


def validate_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id or ""):
        raise TopologyError(f"run id {run_id!r} is not 6 lowercase hex digits")
    return run_id


def choose_public_subnet(run_id: str, used, pool=PUBLIC_POOL, prefixlen: int = DEFAULT_PREFIX):
    """A subnet of ``pool`` that overlaps nothing in ``used`` (networks already taken by
    other runs or present in the root namespace). The search starts at a position
    derived from the run id so that concurrent runs rarely even try the same one."""
    used = [ipaddress.ip_network(u, strict=False) for u in used]
    candidates = list(pool.subnets(new_prefix=prefixlen))
    start = int(hashlib.sha256(run_id.encode()).hexdigest()[:8], 16) % len(candidates)
    for offset in range(len(candidates)):
        candidate = candidates[(start + offset) % len(candidates)]
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise TopologyError(f"no free /{prefixlen} left in {pool}: clean up old runs with "
                        "`python -m lab.hosts cleanup`")


def platforms_public_prefix(platforms) -> int:
    """The prefix length the scenario asks for on the public network (default /24)."""
    for platform in platforms or []:
        for entry in platform.get("networks") or []:
            if entry.get("name") == PUBLIC and entry.get("address") not in (None, "", "auto"):
                return _parse_address(entry["address"], f"platform {platform.get('name')!r}")[1].prefixlen
    return DEFAULT_PREFIX


def build_topology(platforms, run_id: str, public_subnet=None) -> Topology:
    """Validate the scenario's ``platforms`` and lay them out for run ``run_id``.

    ``public_subnet`` is the subnet allocated to this run's public network (see
    :func:`choose_public_subnet`); it must have the prefix the scenario uses.
    """
    validate_run_id(run_id)
    if not platforms:
        raise TopologyError("molecule.yml has no platforms")
    networks: dict = {}
    hosts: dict = {}
    scenario_subnets: dict = {}
    pending = []  # (host, network name, address or None, where)

    for index, platform in enumerate(platforms):
        name = platform.get("name")
        if not isinstance(name, str) or not _HOST_NAME.match(name):
            raise TopologyError(f"platform #{index + 1}: name {name!r} must be a lowercase host name "
                                "(letters, digits, '-', at most 32 characters)")
        if name in hosts:
            raise TopologyError(f"platform {name!r} is listed twice")
        entries = platform.get("networks") or [{"name": PUBLIC}]
        if not isinstance(entries, list):
            raise TopologyError(f"platform {name!r}: networks must be a list of {{name, address}}")
        groups = platform.get("groups") or []
        release = platform.get("release", DEFAULT_RELEASE)
        if release not in RELEASES:
            raise TopologyError(f"platform {name!r}: release {release!r} is not one of {', '.join(RELEASES)}")
        net_admin = platform.get("net_admin", False)
        if not isinstance(net_admin, bool):
            raise TopologyError(f"platform {name!r}: net_admin must be true or false, not {net_admin!r}")
        host = Host(name=name, index=index, proxy_jump=platform.get("proxy_jump"), groups=list(groups),
                    release=release, net_admin=net_admin)
        hosts[name] = host
        seen = set()
        for entry in entries:
            where = f"platform {name!r}"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise TopologyError(f"{where}: each network needs a name, got {entry!r}")
            net = entry["name"]
            if not _NET_NAME.match(net):
                raise TopologyError(f"{where}: network name {net!r} must match {_NET_NAME.pattern}")
            if net in seen:
                raise TopologyError(f"{where}: network {net!r} listed twice")
            seen.add(net)
            where = f"platform {name!r}, network {net!r}"
            raw = entry.get("address", entry.get("ipv4_address"))
            address = None
            if raw not in (None, "", "auto"):
                address, subnet = _parse_address(raw, where)
                previous = scenario_subnets.setdefault(net, subnet)
                if previous != subnet:
                    raise TopologyError(f"{where}: {raw} is not in {previous}, the subnet other hosts "
                                        f"use on {net!r}")
            elif net != PUBLIC:
                raise TopologyError(f"{where}: needs an address (only the public network assigns them)")
            pending.append((host, net, address, where))
            if net not in networks:
                networks[net] = None

    if len(networks) > 50 or len(hosts) > 50:
        raise TopologyError("at most 50 hosts and 50 networks per scenario")

    laid_out = {}
    for index, net in enumerate(networks):
        scenario_subnet = scenario_subnets.get(net)
        if net == PUBLIC:
            if public_subnet is None:
                raise TopologyError("no public subnet allocated for this run")
            subnet = ipaddress.ip_network(public_subnet)
            wanted = scenario_subnet.prefixlen if scenario_subnet else DEFAULT_PREFIX
            if subnet.prefixlen != wanted:
                raise TopologyError(f"allocated public subnet {subnet} is not a /{wanted}")
        else:
            subnet = scenario_subnet
        laid_out[net] = Network(name=net, index=index, subnet=subnet, gateway=subnet.network_address + 1,
                                public=(net == PUBLIC), scenario_subnet=scenario_subnet)

    taken: dict = {net: set(laid_out[net].reserved()) for net in laid_out}
    for host, net, address, where in pending:
        network = laid_out[net]
        if address is not None and network.public:
            offset = int(address) - int(network.scenario_subnet.network_address)
            address = network.subnet.network_address + offset
        if address is None:
            continue
        if address in (network.subnet.network_address, network.subnet.broadcast_address):
            raise TopologyError(f"{where}: {address} is the network or broadcast address")
        if address in network.reserved():
            raise TopologyError(f"{where}: {address} belongs to the harness (the gateway is the first "
                                "usable address, the controller's the last on public)")
        if address in taken[net]:
            raise TopologyError(f"{where}: {address} is used twice on {net!r}")
        taken[net].add(address)
    for host, net, address, where in pending:
        network = laid_out[net]
        if address is None:
            candidate = network.subnet.network_address + FIRST_AUTO_HOST
            while candidate in taken[net]:
                candidate += 1
            if candidate not in network.subnet or candidate == network.subnet.broadcast_address:
                raise TopologyError(f"{where}: no free address left on {net!r}")
            address = candidate
            taken[net].add(address)
        elif network.public:
            address = network.subnet.network_address + (int(address) - int(network.scenario_subnet.network_address))
        host.attachments.append(Attachment(network=net, address=address, ifname=f"eth{len(host.attachments)}"))

    topology = Topology(run_id=run_id, networks=laid_out, hosts=hosts)
    for host in hosts.values():
        if host.proxy_jump is not None:
            jump = hosts.get(host.proxy_jump)
            if jump is None:
                raise TopologyError(f"platform {host.name!r}: proxy_jump {host.proxy_jump!r} is not a platform")
            if jump.name == host.name:
                raise TopologyError(f"platform {host.name!r}: cannot jump through itself")
            if jump.address_on(PUBLIC) is None or jump.proxy_jump is not None:
                raise TopologyError(f"platform {host.name!r}: proxy_jump {jump.name!r} must be on the "
                                    "public network and not jump itself")
            if not any(jump.address_on(a.network) is not None for a in host.attachments):
                raise TopologyError(f"platform {host.name!r}: shares no network with proxy_jump {jump.name!r}")
        elif host.address_on(PUBLIC) is None:
            raise TopologyError(f"platform {host.name!r} is not on the public network, so the controller "
                                "cannot reach it: add `proxy_jump: <a host on public>`")
    return topology


# --- rendering -------------------------------------------------------------------

def ssh_options(key: str, known_hosts: str) -> list:
    for path in (key, known_hosts):
        if re.search(r"[\s'\"]", path):
            raise TopologyError(f"path {path!r} contains whitespace or quotes")
    return ["-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]


def proxy_command(topology: Topology, host: str, key: str, known_hosts: str) -> str | None:
    jump = topology.hosts[host].proxy_jump
    if jump is None:
        return None
    words = ["ssh", "-F", "/dev/null", "-i", key, *ssh_options(key, known_hosts), "-o", "BatchMode=yes",
             "-p", str(SSH_PORT), "-W", "%h:%p", f"root@{topology.ansible_host(jump)}"]
    return " ".join(words)


def ssh_common_args(topology: Topology, host: str, key: str, known_hosts: str) -> str:
    """``ansible_ssh_common_args`` for a host: pinned host keys, and a ProxyCommand
    through the jump host where it has one."""
    args = [*ssh_options(key, known_hosts), "-o", "ControlMaster=auto", "-o", "ControlPersist=60s",
            "-o", "ServerAliveInterval=15"]
    command = proxy_command(topology, host, key, known_hosts)
    if command:
        args += ["-o", f"ProxyCommand={command}"]
    return " ".join(shlex.quote(a) for a in args)


def instance_config(topology: Topology, key: str) -> list:
    """Molecule's ``instance_config`` (read by the default driver when managed)."""
    return [{"instance": name, "address": topology.ansible_host(name), "user": "root", "port": SSH_PORT,
             "identity_file": key} for name in topology.hosts]


def inventory(topology: Topology, key: str, known_hosts: str, control_path_dir: str | None = None) -> dict:
    """An extra inventory source placed next to Molecule's own: it adds the
    per-host ssh arguments Molecule's driver has no field for.

    ``control_path_dir`` keeps Ansible's ssh ControlMaster sockets per run:
    hosts behind a jump host have the same address in every run of a scenario
    (and maybe in other scenarios), and a shared socket would lead into another
    run's host."""
    hosts = {}
    for name in topology.hosts:
        hosts[name] = {
            "ansible_host": topology.ansible_host(name),
            "ansible_user": "root",
            "ansible_port": SSH_PORT,
            "ansible_private_key_file": key,
            "ansible_ssh_common_args": ssh_common_args(topology, name, key, known_hosts),
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        if control_path_dir:
            hosts[name]["ansible_control_path_dir"] = control_path_dir
    return {"all": {"hosts": hosts}}


def host_facts(topology: Topology, name: str, aws_endpoint: bool) -> dict:
    host = topology.hosts[name]
    service = topology.service_address(name)
    facts = {
        "ansible_host": topology.ansible_host(name),
        "addresses": {a.network: str(a.address) for a in host.attachments},
        "interfaces": {a.network: a.ifname for a in host.attachments},
        "networks": [a.network for a in host.attachments],
        "proxy_jump": host.proxy_jump,
        "release": host.release,
        "namespace": topology.host_ns(name),
        "service_address": service,
        "resolver": service,
        "apt_proxy_url": f"http://{service}:{APT_PROXY_PORT}",
    }
    if aws_endpoint:
        facts["aws_endpoint_url"] = f"http://{service}:{AWS_ENDPOINT_PORT}"
    return facts


def testhosts_vars(topology: Topology, key: str, known_hosts: str, ssh_config: str,
                   aws_endpoint_url: str | None = None) -> dict:
    """The variables converge/verify load with ``include_vars`` from
    ``{{ molecule_ephemeral_directory }}/testhosts.yml``."""
    aws = aws_endpoint_url is not None
    data = {
        "testhosts_run_id": topology.run_id,
        "testhosts_ssh_key": key,
        "testhosts_ssh_known_hosts": known_hosts,
        "testhosts_ssh_config": ssh_config,
        "testhosts_apt_proxy_port": APT_PROXY_PORT,
        "testhosts_networks": {
            n.name: {"subnet": str(n.subnet), "prefix": n.prefixlen, "gateway": str(n.gateway),
                     "public": n.public, "controller_reachable": n.public,
                     "controller_address": str(n.controller_address) if n.public else None,
                     "namespace": topology.switch_ns(n.name)}
            for n in topology.networks.values()
        },
        "testhosts_gateways": {n.name: str(n.gateway) for n in topology.networks.values()},
        "testhosts_hosts": {name: host_facts(topology, name, aws) for name in topology.hosts},
        "testhosts_addresses": {name: {a.network: str(a.address) for a in h.attachments}
                                for name, h in topology.hosts.items()},
        # Per-host values, resolved for whichever host a task runs on.
        "testhosts_apt_proxy_url": "{{ testhosts_hosts[inventory_hostname].apt_proxy_url }}",
        "testhosts_resolver": "{{ testhosts_hosts[inventory_hostname].resolver }}",
        "testhosts_aws_endpoint": aws,
    }
    if aws:
        data["testhosts_aws_endpoint_url"] = aws_endpoint_url
        data["testhosts_aws_endpoint_port"] = AWS_ENDPOINT_PORT
        data["testhosts_aws_endpoint_url_from_hosts"] = "{{ testhosts_hosts[inventory_hostname].aws_endpoint_url }}"
    return data


def ssh_config(topology: Topology, key: str, known_hosts: str) -> str:
    """An ssh_config for people: ``ssh -F <file> private``."""
    lines = [f"# fleetkeeper test hosts, run {topology.run_id}", ""]
    for name, host in topology.hosts.items():
        lines += [f"Host {name}", f"  HostName {topology.ansible_host(name)}", "  User root",
                  f"  IdentityFile {key}", "  IdentitiesOnly yes", f"  UserKnownHostsFile {known_hosts}",
                  "  StrictHostKeyChecking yes"]
        if host.proxy_jump:
            lines.append(f"  ProxyJump {host.proxy_jump}")
        lines.append("")
    return "\n".join(lines)


def known_hosts_lines(topology: Topology, host_keys: dict) -> str:
    """known_hosts with each host's public key under all of its addresses and its name."""
    lines = []
    for name, host in topology.hosts.items():
        names = ",".join([*(str(a.address) for a in host.attachments)])
        for key in host_keys.get(name, []):
            lines.append(f"{names} {key.strip()}")
    return "\n".join(lines) + "\n"

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The dns_cache role's upstream pacing script, rendered from the role's template, on real kernels objects.

Two network namespaces made for the test, linked by a veth pair: ``client`` runs
the script (``ip`` and ``tc`` act on that namespace only) and dnsperf;
``upstream`` runs BIND authoritative for the zone behind an nftables rule that
drops what exceeds 300 packets a second (burst 20), as the VPC resolver's limit
does. A burst of 400 queries within a tenth of a second loses packets to that
rule without pacing; with pacing at 250 a second every query is answered and
the rule drops none. Nothing leaves the two namespaces.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from lab import dnsservers
from lab.dnscache import render_named_conf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dnsservers.have_netns(), reason="needs root and ip netns"),
]

ZONE = "pace.test"
CLIENT, UPSTREAM = "198.18.77.1", "198.18.77.2"
DEVICE, PREF = "fkdnspace", 49152


def render(tmp, name, mode):
    overrides = {"dns_cache_upstreams": [{"address": UPSTREAM, "port": 53}],
                 "dns_cache_upstream_pacing": mode, "dns_cache_upstream_pacing_pps": 250,
                 "dns_cache_upstream_pacing_queue_ms": 1900,
                 "__dns_cache_pacing_script": os.path.join(tmp, name, "fleetkeeper-dns-pacing"),
                 "__dns_cache_pacing_state_dir": os.path.join(tmp, name, "state")}
    staged = render_named_conf({name: {"family": "Debian", "overrides": overrides, "absolute": True,
                                       "pacing": True}}, tmp)
    return staged[name][2]["__dns_cache_pacing_script"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    dnsservers.fetch_servers()
    tmp = str(tmp_path_factory.mktemp("pacing"))
    client, upstream = dnsservers.Netns("pc"), dnsservers.Netns("pu")
    try:
        dnsservers.veth_link(client, upstream, CLIENT, UPSTREAM)
        dnsservers.AuthServer(upstream, UPSTREAM, ZONE, {"www": (300, "192.0.2.10")},
                              workdir=os.path.join(tmp, "up"))
        dnsservers.limit_udp53(upstream, 300, 20)
        queries = os.path.join(tmp, "queries.txt")
        with open(queries, "w", encoding="utf-8") as handle:
            handle.writelines("n%d.%s A\n" % (i, ZONE) for i in range(400))
        scripts = {mode: render(tmp, "pacing-" + mode, mode) for mode in ("auto", "true")}
        yield client, upstream, scripts, queries
    finally:
        client.close()
        upstream.close()


def burst(client, upstream, queries):
    """400 queries within about 0.1 s; (answered, dropped by the upstream's limit)."""
    before = dnsservers.limit_counters(upstream)
    out = client.run(["dnsperf", "-s", UPSTREAM, "-d", queries, "-n", "1", "-Q", "4000", "-q", "500",
                      "-t", "5"], check=False).stdout
    after = dnsservers.limit_counters(upstream)
    completed = int(out.split("Queries completed:")[1].split()[0])
    return completed, after[1] - before[1]


def veth(client):
    return next(line.split(":")[1].strip().split("@")[0] for line in client.run(["ip", "-o", "link"]).stdout.splitlines()
                if "fkd" in line)


def our_filters(client, everything=False):
    """The script's filter lines on the veth (everything: with their match and action lines)."""
    proc = client.run(["tc", "filter", "show", "dev", veth(client), "egress"], check=False)
    return [line for line in proc.stdout.splitlines() if everything or "pref %d" % PREF in line]


def has_device(client):
    return client.run(["ip", "link", "show", "dev", DEVICE], check=False).returncode == 0


def status(script):
    path = os.path.join(os.path.dirname(script), "state", "status")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def test_without_pacing_the_limit_drops_part_of_a_burst(env):
    client, upstream, _scripts, queries = env
    completed, dropped = burst(client, upstream, queries)
    assert dropped > 50 and completed < 400, (completed, dropped)


def test_pacing_queues_a_burst_under_the_limit_and_stop_removes_it(env):
    client, upstream, scripts, queries = env
    script = scripts["true"]
    client.run(["bash", script, "start"])
    try:
        assert status(script) == "on"
        assert has_device(client)
        assert our_filters(client), client.run(["tc", "filter", "show", "dev", veth(client), "egress"]).stdout
        completed, dropped = burst(client, upstream, queries)
        assert (completed, dropped) == (400, 0)
        # Starting again (the unit restarted after a change) replaces, never duplicates.
        client.run(["bash", script, "start"])
        redirects = [line for line in our_filters(client, everything=True) if "Redirect to device %s" % DEVICE in line]
        assert len(redirects) == 2, redirects  # UDP and TCP, once each
    finally:
        client.run(["bash", script, "stop"])
    assert not has_device(client) and not our_filters(client) and status(script) is None
    completed, dropped = burst(client, upstream, queries)
    assert dropped > 0, "after stop the burst reaches the limit unpaced again"


@pytest.mark.parametrize("mode, code", [("auto", 0), ("true", 1)])
def test_a_host_without_cap_net_admin(env, mode, code):
    """auto reports why and leaves the host unpaced; true (required) fails with the same reason."""
    client, _upstream, scripts, _queries = env
    proc = subprocess.run(client.cmd(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
                                      "bash", scripts[mode], "start"]),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == code, proc.stderr
    assert "cannot create the ifb device" in proc.stderr
    assert status(scripts[mode]).startswith("off: cannot create the ifb device fkdnspace (the host needs CAP_NET_ADMIN")
    assert not has_device(client) and not our_filters(client)

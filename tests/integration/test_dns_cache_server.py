# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The role's BIND configuration on a real named, and dns_cache_stats reading it.

named (Debian's 9.18 package, unpacked by lab/dnsservers.py) runs with
the configuration the role's templates render, inside a network namespace made
for the test, forwarding to a second named authoritative for fk.test on
127.0.0.2 in the same namespace. Nothing leaves the namespace.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from lab import dnsservers
from lab.dnscache import CacheServer, run_playbook_in_netns

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dnsservers.have_netns(), reason="needs root and ip netns"),
]

RECORDS = {"www": (300, "192.0.2.10"), "api": (300, "192.0.2.11"), "short": (2, "192.0.2.12"),
           "db": (300, "192.0.2.13")}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    dnsservers.fetch_servers()
    work = str(tmp_path_factory.mktemp("dnscache"))
    ns = dnsservers.Netns("it")
    try:
        upstream = dnsservers.AuthServer(ns, "127.0.0.2", "fk.test", RECORDS, workdir=os.path.join(work, "up"))
        cache = CacheServer(ns, os.path.join(work, "cache"),
                            {"dns_cache_upstreams": [{"address": "127.0.0.2", "port": 53}]})
        yield ns, upstream, cache
    finally:
        ns.close()


def answer_ttl(output: str, name: str) -> int:
    match = re.search(r"^%s\.\s+(\d+)\s+IN\s+A\s" % re.escape(name), output, re.M)
    assert match, output
    return int(match.group(1))


def test_second_query_is_answered_from_cache(env):
    ns, upstream, _cache = env
    before = upstream.query_count()
    first = dnsservers.dig(ns, "127.0.0.1", 53, "www.fk.test")
    assert dnsservers.dig_status(first) == "NOERROR" and "192.0.2.10" in first
    after_first = upstream.query_count()
    for _attempt in range(5):
        again = dnsservers.dig(ns, "127.0.0.1", 53, "www.fk.test")
        assert "192.0.2.10" in again
    assert after_first - before == 1
    assert upstream.query_count() == after_first  # five answers, no upstream query


def test_stats_module_sees_hits_and_upstream_queries(env):
    ns, upstream, _cache = env
    read = {"name": "read", "fleetkeeper.aws.dns_cache_stats": {}}
    before = run_playbook_in_netns(ns, [{"hosts": "localhost", "gather_facts": False, "tasks": [read]}])
    assert before.returncode == 0, before.stdout + before.stderr
    for _attempt in range(4):
        assert "192.0.2.11" in dnsservers.dig(ns, "127.0.0.1", 53, "api.fk.test")
    tasks = [dict(read, name="json"),
             {"name": "xml", "fleetkeeper.aws.dns_cache_stats": {"format": "xml"}}]
    after = run_playbook_in_netns(ns, [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}])
    assert after.returncode == 0, after.stdout + after.stderr
    b, a, x = before.task("read"), after.task("json"), after.task("xml")
    assert a["format"] == "json" and x["format"] == "xml"
    assert a["queries"] - b["queries"] == 4
    assert a["cache_hits"] - b["cache_hits"] == 3
    assert a["upstream_queries"] - b["upstream_queries"] == 1
    assert 0 < a["hit_ratio"] < 1 and a["cache_memory_bytes"] > 0 and not a.changed
    for key in ("queries", "cache_hits", "cache_misses", "upstream_queries"):
        assert a[key] == x[key], key


def test_stats_module_on_a_closed_port_fails_clearly(env):
    ns, _upstream, _cache = env
    run = run_playbook_in_netns(ns, [{"hosts": "localhost", "gather_facts": False, "tasks": [
        {"name": "read", "fleetkeeper.aws.dns_cache_stats": {"port": 9, "timeout": 2}, "ignore_errors": True}]}])
    result = run.task("read")
    assert result.failed
    assert "cannot read http://127.0.0.1:9/json/v1/server" in result["msg"]
    assert "statistics-channels" in result["msg"]


def test_serve_stale_when_the_upstream_stops_answering(env):
    ns, _upstream, _cache = env
    assert "192.0.2.12" in dnsservers.dig(ns, "127.0.0.1", 53, "short.fk.test")
    time.sleep(3)  # the record's TTL (2 s) has run out
    # The upstream now drops every packet, as an overloaded VPC resolver does.
    ns.run(["nft", "add table inet fkdrop; add chain inet fkdrop out { type filter hook output priority 0; }; "
                   "add rule inet fkdrop out ip daddr 127.0.0.2 drop"])
    try:
        start = time.monotonic()
        stale = dnsservers.dig(ns, "127.0.0.1", 53, "short.fk.test")
        elapsed = time.monotonic() - start
        assert dnsservers.dig_status(stale) == "NOERROR", stale
        assert "192.0.2.12" in stale
        assert answer_ttl(stale, "short.fk.test") == 30  # stale-answer-ttl
        assert elapsed < 1.0  # before a resolv.conf timeout of 1 s sends the client elsewhere
        never_cached = dnsservers.dig(ns, "127.0.0.1", 53, "db.fk.test")
        assert dnsservers.dig_status(never_cached) in ("SERVFAIL", "TIMEOUT")
    finally:
        ns.run(["nft", "delete table inet fkdrop"], check=False)


def test_queries_from_another_host_get_no_answer(env):
    ns, _upstream, _cache = env
    with dnsservers.Netns("other") as other:
        dnsservers.veth_link(ns, other, "198.18.53.1", "198.18.53.2")
        # The host answers (ICMP port unreachable: "connection refused"), but nothing of the
        # cache listens on its own address.
        out = other.run(["dig", "+tries=1", "+time=1", "@198.18.53.1", "www.fk.test"], check=False).stdout
        assert "status:" not in out and "refused" in out, out
        stats = other.run(["dig", "+tries=1", "+time=1", "+tcp", "-p", "954", "@198.18.53.1", "x"],
                          check=False).stdout
        assert "status:" not in stats, stats
        # A query reaching the loopback listener from a non-loopback source is refused by the ACL.
        out = ns.run(["dig", "+tries=1", "+time=2", "-b", "198.18.53.1", "@127.0.0.1", "www.fk.test"],
                     check=False).stdout
        assert dnsservers.dig_status(out) == "REFUSED", out

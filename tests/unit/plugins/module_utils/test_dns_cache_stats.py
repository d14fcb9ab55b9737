# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The statistics parser on documents recorded from a real BIND 9.18 (see fixtures/dns_cache/record.py)."""

from __future__ import annotations

import http.server
import json
import os
import threading

import pytest

from lab.ansiblerun import REPO_ROOT

from ansible_collections.fleetkeeper.aws.plugins.module_utils import dns_cache_stats as stats

FIXTURES = os.path.join(REPO_ROOT, "tests", "unit", "fixtures", "dns_cache")


def fixture(name: str) -> str:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as handle:
        return handle.read()


@pytest.fixture(scope="module")
def plan():
    return json.loads(fixture("plan.json"))


def expected_from_plan(plan: dict) -> dict:
    probe = len(plan["extra_positive_misses"])
    positive = plan["positive_names"] * plan["positive_repeats"]
    nxdomain = plan["nxdomain_names"] * plan["nxdomain_repeats"]
    misses_upstream = probe + plan["positive_names"] + plan["nxdomain_names"] + plan["servfail_queries"]
    return {
        "queries": probe + positive + nxdomain + plan["servfail_queries"],
        "cache_hits": positive - plan["positive_names"] + nxdomain - plan["nxdomain_names"],
        # Each SERVFAIL costs a second (stale-data) cache lookup, counted as a miss too.
        "cache_misses": misses_upstream + plan["servfail_queries"],
        "upstream_queries": misses_upstream,
        "recursive_queries": misses_upstream,
        "servfail": plan["servfail_queries"],
        "nxdomain": nxdomain,
    }


@pytest.mark.parametrize("name,fmt", [("server.json", "json"), ("server.xml", "xml")])
def test_recorded_document_gives_the_plan_s_counts(name, fmt, plan):
    summary = stats.summarize(stats.parse(fixture(name), fmt))
    expected = expected_from_plan(plan)
    for key, value in expected.items():
        assert summary[key] == value, key
    hits, misses = expected["cache_hits"], expected["cache_misses"]
    assert summary["hit_ratio"] == round(hits / (hits + misses), 4)
    assert summary["format"] == fmt
    assert summary["bind_version"] == plan["bind_version"]
    assert list(summary["views"]) == ["_default"]  # _bind left out


def test_xml_and_json_agree():
    from_json = stats.summarize(stats.parse_json(fixture("server.json")))
    from_xml = stats.summarize(stats.parse_xml(fixture("server.xml")))
    for key in ("queries", "cache_hits", "cache_misses", "hit_ratio", "upstream_queries", "servfail",
                "cache_nodes", "views"):
        assert from_json[key] == from_xml[key], key


def test_cache_memory_is_tree_plus_heap_of_the_default_view():
    doc = json.loads(fixture("server.json"))
    cache = doc["views"]["_default"]["resolver"]["cachestats"]
    summary = stats.summarize(stats.parse_json(fixture("server.json")))
    assert summary["cache_memory_bytes"] == cache["TreeMemInUse"] + cache["HeapMemInUse"] > 0


def test_hit_ratio_uses_query_counters_not_cache_lookups():
    doc = json.loads(fixture("server.json"))
    cache = doc["views"]["_default"]["resolver"]["cachestats"]
    assert cache["CacheMisses"] != cache["QueryMisses"]  # the recorded document shows why it matters
    summary = stats.summarize(stats.parse_json(fixture("server.json")))
    assert summary["cache_misses"] == cache["QueryMisses"]


def test_one_view_and_an_unknown_view():
    raw = stats.parse_json(fixture("server.json"))
    assert stats.summarize(raw, view="_bind")["cache_hits"] == 0
    with pytest.raises(stats.StatsFormatError, match="no view 'internal'.*_bind, _default"):
        stats.summarize(raw, view="internal")


def test_empty_counters_give_a_zero_ratio():
    assert stats.hit_ratio(0, 0) == 0.0


@pytest.mark.parametrize("text,fmt,message", [
    ("<html>404</html>", "json", "not JSON"),
    ('{"views": {}}', "json", "json-stats-version"),
    ("not xml at all <", "xml", "not XML"),
    ("<html><body>hello</body></html>", "xml", "not <statistics>"),
    ('<statistics version="2.2"><server/></statistics>', "xml", "only version 3"),
    ('<statistics version="3.13"><memory/></statistics>', "xml", "/xml/v3/server"),
])
def test_documents_that_are_not_bind_statistics(text, fmt, message):
    with pytest.raises(stats.StatsFormatError, match=message):
        stats.parse(text, fmt)


class HttpError(Exception):
    def __init__(self, code):
        super().__init__("HTTP Error %d" % code)
        self.code = code


def test_auto_falls_back_to_xml_when_json_is_not_served():
    asked = []

    def getter(url, timeout):
        asked.append(url)
        if url.endswith("/json/v1/server"):
            raise HttpError(404)
        return fixture("server.xml")

    summary = stats.read_stats(port=954, getter=getter)
    assert summary["format"] == "xml" and summary["url"] == "http://127.0.0.1:954/xml/v3/server"
    assert asked == ["http://127.0.0.1:954/json/v1/server", "http://127.0.0.1:954/xml/v3/server"]


def test_json_only_reports_missing_json_support():
    def getter(url, timeout):
        raise HttpError(404)

    with pytest.raises(stats.StatsEndpointError, match="does not serve that format"):
        stats.read_stats(fmt="json", getter=getter)


def test_forbidden_says_to_check_the_allow_list():
    def getter(url, timeout):
        raise HttpError(403)

    with pytest.raises(stats.StatsEndpointError, match="HTTP 403.*allow list"):
        stats.read_stats(getter=getter)


def test_ipv6_host_is_bracketed():
    assert stats.stats_url("::1", 954, "xml") == "http://[::1]:954/xml/v3/server"


class _Handler(http.server.BaseHTTPRequestHandler):
    documents: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        body = self.documents.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if "json" in self.path else "text/xml")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def stats_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_reads_over_http_with_ansible_s_url_code(stats_server):
    _Handler.documents = {"/xml/v3/server": fixture("server.xml")}
    summary = stats.read_stats(port=stats_server.server_address[1])
    assert summary["format"] == "xml" and summary["cache_hits"] == 23
    _Handler.documents = {"/json/v1/server": fixture("server.json"), "/xml/v3/server": fixture("server.xml")}
    assert stats.read_stats(port=stats_server.server_address[1])["format"] == "json"


def test_unreachable_endpoint_names_the_url_and_the_fix(stats_server):
    port = stats_server.server_address[1]
    stats_server.shutdown()
    stats_server.server_close()
    with pytest.raises(stats.StatsEndpointError, match=r"cannot read http://127.0.0.1:%d/json/v1/server.*"
                                                       r"statistics-channels" % port):
        stats.read_stats(port=port, timeout=2)

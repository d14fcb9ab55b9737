# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The dns_cache role's BIND templates, rendered by Ansible per OS family and checked by named-checkconf.

The templates are rendered by lab.dnscache.render_named_conf (ansible-core's ``template`` lookup in one small
Python process, with the role's defaults, vars files and each case's variables as task vars), the renderer
the integration tests and the DNS benchmark use too.

The check is the one the role runs on a host: the files are staged in a tree
laid out like the host's file system and ``named-checkconf -t STAGE MAIN`` reads
the main file with every include resolved inside the stage (Debian's
/etc/bind layout and RHEL's /etc/named.conf + /etc/named/ layout).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from lab import dnsservers
from lab.dnscache import checkconf, read_staged, render_named_conf

pytestmark = pytest.mark.skipif(shutil.which("named-checkconf") is None,
                                reason="named-checkconf (bind9-utils, in FK_DEBS) is not installed")

CASES = {
    "debian": {"family": "Debian"},
    "redhat": {"family": "RedHat"},
    "al2_bind911": {"family": "RedHat", "version": "9.11.4"},
    "bind916": {"family": "Debian", "version": "9.16.48"},
    "vpc_upstreams_no_ipv6": {"family": "Debian", "overrides": {
        "dns_cache_upstreams": [{"address": "10.0.0.2"}, {"address": "fd00:ec2::253", "port": 53}],
        "dns_cache_listen_ipv6": [], "dns_cache_port": 5353, "dns_cache_stats_port": 8954,
        "dns_cache_worker_threads": 2}},
    "validating": {"family": "RedHat", "overrides": {
        "dns_cache_dnssec_validation": "auto", "dns_cache_validate_except": ["corp.internal", "example.test"],
        "dns_cache_serve_stale": False, "dns_cache_prefetch_trigger": 0, "dns_cache_query_log": True,
        "dns_cache_stats_enabled": False, "dns_cache_extra_options": ["max-udp-size 1232;"]}},
    "validating_bind911": {"family": "RedHat", "version": "9.11.36", "overrides": {
        "dns_cache_dnssec_validation": "auto", "dns_cache_validate_except": ["corp.internal"]}},
    "fetch_limits": {"family": "Debian", "overrides": {
        "dns_cache_fetches_per_server": 64, "dns_cache_fetches_per_zone": 200, "dns_cache_fetch_limit_response": "fail",
        "dns_cache_clients_per_query": 50, "dns_cache_max_clients_per_query": 0}},
    "fetch_limits_bind911": {"family": "RedHat", "version": "9.11.4", "overrides": {
        "dns_cache_fetches_per_server": 64, "dns_cache_fetches_per_zone": 200}},
    "fetch_limits_bind920": {"family": "Debian", "version": "9.20.23", "overrides": {
        "dns_cache_fetches_per_server": 64}},
    "paced": {"family": "Debian", "pacing": True, "overrides": {"__dns_cache_pacing_active": True}},
    "paced_short_queue": {"family": "RedHat", "pacing": True, "overrides": {
        "__dns_cache_pacing_active": True, "dns_cache_upstream_pacing_queue_ms": 400,
        "dns_cache_upstream_pacing_pps": 500, "dns_cache_upstream_pacing": True,
        "dns_cache_upstreams": [{"address": "10.0.0.2"}, {"address": "fd00:ec2::253", "port": 5353}]}},
    "paced_bind920": {"family": "Debian", "version": "9.20.23", "pacing": True,
                      "overrides": {"__dns_cache_pacing_active": True}},
    "bad_upstream": {"family": "Debian", "overrides": {"dns_cache_upstreams": [{"address": "10.0.0.300"}]}},
    "bad_cache_size": {"family": "RedHat", "overrides": {"dns_cache_max_cache_size": "lots"}},
    "bad_extra_option": {"family": "Debian", "overrides": {"dns_cache_extra_options": ["no-such-option yes;"]}},
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return render_named_conf(CASES, str(tmp_path_factory.mktemp("named")))


def options_text(rendered, case):
    stage, _main, values = rendered[case]
    return read_staged(stage, values["__dns_cache_options_file"])


def statements(text):
    """Config lines without comments, whitespace-normalised."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("bad_")])
def test_named_checkconf_accepts(rendered, case):
    stage, main, _values = rendered[case]
    result = checkconf(stage, main)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case,error", [
    ("bad_upstream", "expected IP address near '10.0.0.300'"),
    ("bad_cache_size", "lots"),
    ("bad_extra_option", "unknown option 'no-such-option'"),
])
def test_named_checkconf_rejects_bad_variables(rendered, case, error):
    stage, main, _values = rendered[case]
    result = checkconf(stage, main)
    assert result.returncode != 0
    assert error in result.stdout + result.stderr


def test_os_family_layouts(rendered):
    deb_stage, deb_main, _deb_values = rendered["debian"]
    rh_stage, rh_main, _rh_values = rendered["redhat"]
    assert deb_main == "/etc/bind/named.conf" and rh_main == "/etc/named.conf"
    assert 'include "/etc/bind/named.conf.options";' in read_staged(deb_stage, deb_main)
    assert 'include "/etc/named/dns_cache.options.conf";' in read_staged(rh_stage, rh_main)
    assert 'directory "/var/cache/bind";' in statements(options_text(rendered, "debian"))
    rh = statements(options_text(rendered, "redhat"))
    assert 'directory "/var/named";' in rh and 'managed-keys-directory "/var/named/dynamic";' in rh


def test_starts_with_ansible_managed(rendered):
    stage, main, values = rendered["debian"]
    for path in (main, values["__dns_cache_options_file"]):
        assert read_staged(stage, path).startswith("#\n# Ansible managed")


def test_caching_only_on_loopback_forward_only(rendered):
    lines = statements(options_text(rendered, "debian"))
    assert "listen-on port 53 { 127.0.0.1; };" in lines
    assert "listen-on-v6 port 53 { ::1; };" in lines
    assert 'acl "dns_cache_clients" { 127.0.0.0/8; ::1/128; };' in lines
    for statement in ("allow-query", "allow-query-cache", "allow-recursion"):
        assert "%s { dns_cache_clients; };" % statement in lines
    assert "forward only;" in lines and "forward first;" not in lines
    assert "169.254.169.253 port 53;" in lines
    assert "max-cache-size 128M;" in lines
    assert "dnssec-validation no;" in lines
    assert "querylog no;" in lines
    assert "statistics-channels {" in lines
    assert "inet 127.0.0.1 port 954 allow { 127.0.0.1; };" in lines


def test_serve_stale_on_918(rendered):
    lines = statements(options_text(rendered, "debian"))
    for statement in ("stale-answer-enable yes;", "stale-cache-enable yes;", "max-stale-ttl 86400;",
                      "stale-answer-ttl 30;", "stale-refresh-time 30;", "prefetch 2 9;"):
        assert statement in lines


def test_bind_911_gets_no_options_it_does_not_know(rendered):
    text = options_text(rendered, "al2_bind911")
    assert "stale-" not in text and "validate-except" not in text
    assert "Written for BIND 9.11.4" in text
    text = options_text(rendered, "validating_bind911")
    assert "validate-except" not in text and "dnssec-validation auto;" in text


def test_bind_916_has_serve_stale(rendered):
    lines = statements(options_text(rendered, "bind916"))
    assert "stale-cache-enable yes;" in lines and "stale-answer-enable yes;" in lines


def test_variables_reach_the_config(rendered):
    lines = statements(options_text(rendered, "vpc_upstreams_no_ipv6"))
    assert "10.0.0.2 port 53;" in lines and "fd00:ec2::253 port 53;" in lines
    assert "listen-on-v6 { none; };" in lines
    assert "listen-on port 5353 { 127.0.0.1; };" in lines
    assert "inet 127.0.0.1 port 8954 allow { 127.0.0.1; };" in lines
    lines = statements(options_text(rendered, "validating"))
    assert 'validate-except { "corp.internal"; "example.test"; };' in lines
    assert "stale-answer-enable no;" in lines and "stale-cache-enable no;" in lines
    assert not [line for line in lines if line.startswith(("max-stale-ttl", "stale-refresh-time"))]
    assert "prefetch 0;" in lines and "querylog yes;" in lines and "max-udp-size 1232;" in lines
    assert "statistics-channels {" not in lines


def test_no_empty_or_stray_lines_in_blocks(rendered):
    text = options_text(rendered, "debian")
    assert not re.search(r"\n\s*;\s*\n", text)


def test_fetch_limits_default(rendered):
    lines = statements(options_text(rendered, "debian"))
    assert "fetches-per-server 0;" in lines and "fetches-per-zone 0;" in lines
    assert "clients-per-query 10;" in lines and "max-clients-per-query 100;" in lines


def test_fetch_limits_reach_the_config(rendered):
    lines = statements(options_text(rendered, "fetch_limits"))
    assert "fetches-per-server 64 fail;" in lines
    assert "fetches-per-zone 200 fail;" in lines
    assert "clients-per-query 50;" in lines and "max-clients-per-query 0;" in lines
    lines = statements(options_text(rendered, "fetch_limits_bind920"))
    assert "fetches-per-server 64 drop;" in lines and "fetches-per-zone 0;" in lines


def test_fetch_limits_gated_on_bind_914(rendered):
    # BIND 9.11 has fetches-per-server/-zone only when built with --enable-fetchlimit: left out.
    text = options_text(rendered, "fetch_limits_bind911")
    assert "fetches-per-" not in text
    lines = statements(text)
    assert "clients-per-query 10;" in lines and "max-clients-per-query 100;" in lines


@pytest.fixture(scope="module")
def bpo_checkconf():
    """BIND 9.20's named-checkconf, fetched on first use like the other test servers (lab/dnsservers.py):
    a machine without it gets it here instead of skipping the check."""
    root = dnsservers.fetch_bind_backports()
    path = dnsservers.binary_path("named-checkconf", root)
    assert os.path.exists(path), path
    return path


@pytest.mark.parametrize("case", ["fetch_limits_bind920", "fetch_limits", "paced_bind920"])
def test_bind_920_checkconf_accepts(rendered, bpo_checkconf, case):
    """9.20 (bookworm-backports, Debian 13) removed options 9.18 still takes: its own checker reads the files."""
    stage, main, _values = rendered[case]
    result = checkconf(stage, main, bpo_checkconf, dnsservers.server_env(dnsservers.BPO_ROOT))
    assert result.returncode == 0, result.stdout + result.stderr


def test_bind_920_stale_answer_client_timeout_off(rendered):
    # 9.19+ accepts only 0 or off, and with 0 it re-asks the upstream for cached NXDOMAIN answers.
    lines = statements(options_text(rendered, "fetch_limits_bind920"))
    assert "stale-answer-client-timeout off;" in lines
    assert "stale-answer-client-timeout 900;" in statements(options_text(rendered, "debian"))


def test_pacing_tunes_bind_918_for_the_queue(rendered):
    """Where pacing is on, BIND 9.18 waits as long as the queue before asking again, picks source ports from
    the whole unprivileged range and does not re-ask at the stale-answer timer (docs/dns_cache.md)."""
    lines = statements(options_text(rendered, "paced"))
    assert "resolver-retry-interval 2000;" in lines  # the default queue of 1950 ms plus 50
    assert "use-v4-udp-ports { range 1024 65535; };" in lines
    assert "stale-answer-client-timeout off;" in lines
    short = statements(options_text(rendered, "paced_short_queue"))
    assert "resolver-retry-interval 450;" in short
    # Popular names wait in the queue with hundreds of clients: no clients-per-query limit while paced.
    for case in ("paced", "paced_short_queue", "paced_bind920"):
        text = statements(options_text(rendered, case))
        assert "clients-per-query 0;" in text and "max-clients-per-query 0;" in text
    unpaced = statements(options_text(rendered, "debian"))
    assert "clients-per-query 10;" in unpaced and "max-clients-per-query 100;" in unpaced
    for case in ("debian", "redhat", "fetch_limits"):
        text = options_text(rendered, case)
        assert "resolver-retry-interval" not in text and "udp-ports" not in text


def test_pacing_on_bind_920_leaves_retries_alone(rendered):
    # 9.20 has no resolver-retry-interval (named refuses it); its queue is shorter instead.
    text = options_text(rendered, "paced_bind920")
    assert "resolver-retry-interval" not in text and "udp-ports" not in text


def pacing_script(rendered, case):
    stage, _main, values = rendered[case]
    return read_staged(stage, values["__dns_cache_pacing_script"])


def test_pacing_script_values(rendered):
    """The queue's length follows the BIND version (1950 ms on 9.18, 750 ms on 9.20) or the variables."""
    script = pacing_script(rendered, "paced")
    assert "\nPPS=1000\n" in script and "\nQUEUE=1950\n" in script and "\nMODE=auto\n" in script
    assert "\nQUEUE=750\n" in pacing_script(rendered, "paced_bind920")
    short = pacing_script(rendered, "paced_short_queue")
    assert "\nPPS=500\n" in short and "\nQUEUE=200\n" in short and "\nMODE=require\n" in short
    assert "UPSTREAMS='10.0.0.2 53\nfd00:ec2::253 5353'" in short
    for case in ("paced", "paced_short_queue", "paced_bind920"):
        result = subprocess.run(["bash", "-n"], input=pacing_script(rendered, case), capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0, result.stderr

# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Read BIND 9's statistics channel and turn it into cache figures.

Pure logic with no AnsibleModule inside: ``parse_json`` and ``parse_xml``
normalise ``/json/v1/server`` and ``/xml/v3/server`` into one shape,
``summarize`` computes the figures, ``read_stats`` fetches (JSON first, XML
when the server has no JSON support) and raises ``StatsEndpointError`` or
``StatsFormatError`` with a message that says what to fix.

Which counters, and why (checked against BIND 9.18):

- hit ratio = QueryHits / (QueryHits + QueryMisses) from each view's
  ``cachestats``. These count once per client query. CacheHits/CacheMisses
  count every internal cache lookup (several per query) and mislead.
  QueryMisses also counts the second lookup BIND makes for stale data after a
  failed fetch, so a failing upstream lowers the ratio.
- upstream queries = the view's resolver ``Queryv4`` + ``Queryv6``.
- client queries = ``nsstat`` ``Requestv4`` + ``Requestv6``. ``QryRecursion``
  is not the count of recursive client queries: BIND counts there only the
  queries that made it recurse (cache misses that went upstream). Recorded on
  9.18: 39 client queries, 23 answered from cache, QryRecursion 16.
- SERVFAILs = ``nsstat`` ``QrySERVFAIL`` (answers sent to clients).
- cache memory = ``TreeMemInUse`` + ``HeapMemInUse`` of each view's cache.

The ``_bind`` view (CHAOS class, version.bind and friends) is left out.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

try:
    from ansible.module_utils.urls import open_url
except ImportError:  # pragma: no cover - ansible is always there when Ansible runs this
    open_url = None

INTERNAL_VIEWS = ("_bind",)
DEFAULT_PORT = 954


class DnsCacheStatsError(Exception):
    """Base class for statistics errors."""


class StatsEndpointError(DnsCacheStatsError):
    """The statistics channel could not be reached or answered with an error."""


class StatsFormatError(DnsCacheStatsError):
    """The answer is not a BIND statistics document this code understands."""


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_json(text):
    """Normalise a /json/v1/server document."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise StatsFormatError("not JSON: %s" % exc)
    if not isinstance(doc, dict) or "json-stats-version" not in doc:
        raise StatsFormatError("JSON without 'json-stats-version': not a BIND statistics document")
    views = {}
    for name, view in (doc.get("views") or {}).items():
        resolver = view.get("resolver") or {}
        views[name] = {
            "resstats": dict((k, _int(v)) for k, v in (resolver.get("stats") or {}).items()),
            "cachestats": dict((k, _int(v)) for k, v in (resolver.get("cachestats") or {}).items()),
        }
    return {
        "format": "json",
        "stats_version": str(doc.get("json-stats-version")),
        "version": doc.get("version"),
        "boot_time": doc.get("boot-time"),
        "config_time": doc.get("config-time"),
        "current_time": doc.get("current-time"),
        "nsstat": dict((k, _int(v)) for k, v in (doc.get("nsstats") or {}).items()),
        "rcode": dict((k, _int(v)) for k, v in (doc.get("rcodes") or {}).items()),
        "views": views,
    }


def _counters(element, kind):
    out = {}
    for counters in element.findall("counters"):
        if counters.get("type") == kind:
            for counter in counters.findall("counter"):
                out[counter.get("name")] = _int(counter.text)
    return out


def parse_xml(text):
    """Normalise a /xml/v3/server document."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise StatsFormatError("not XML: %s" % exc)
    if root.tag != "statistics":
        raise StatsFormatError("XML root is <%s>, not <statistics>: not a BIND statistics document" % root.tag)
    stats_version = root.get("version") or ""
    if not stats_version.startswith("3."):
        raise StatsFormatError("XML statistics version %r: only version 3 (BIND 9.10 and later) is supported"
                               % stats_version)
    server = root.find("server")
    if server is None:
        raise StatsFormatError("XML statistics without <server>: fetch /xml/v3/server")
    views = {}
    views_el = root.find("views")
    for view in (views_el.findall("view") if views_el is not None else []):
        views[view.get("name")] = {
            "resstats": _counters(view, "resstats"),
            "cachestats": _counters(view, "cachestats"),
        }

    def text_of(tag):
        found = server.find(tag)
        return found.text if found is not None else None

    return {
        "format": "xml",
        "stats_version": stats_version,
        "version": text_of("version"),
        "boot_time": text_of("boot-time"),
        "config_time": text_of("config-time"),
        "current_time": text_of("current-time"),
        "nsstat": _counters(server, "nsstat"),
        "rcode": _counters(server, "rcode"),
        "views": views,
    }


def parse(text, fmt):
    if fmt == "json":
        return parse_json(text)
    if fmt == "xml":
        return parse_xml(text)
    raise ValueError("format must be json or xml, not %r" % fmt)


def summarize(raw, view=None):
    """Cache figures from a normalised document, over one view or all but the internal ones."""
    if view is not None:
        if view not in raw["views"]:
            raise StatsFormatError("no view %r in the statistics (views: %s)"
                                   % (view, ", ".join(sorted(raw["views"])) or "none"))
        names = [view]
    else:
        names = [name for name in sorted(raw["views"]) if name not in INTERNAL_VIEWS]
    hits = misses = upstream = timeouts = memory = nodes = 0
    per_view = {}
    for name in names:
        cache = raw["views"][name]["cachestats"]
        res = raw["views"][name]["resstats"]
        view_hits, view_misses = cache.get("QueryHits", 0), cache.get("QueryMisses", 0)
        view_upstream = res.get("Queryv4", 0) + res.get("Queryv6", 0)
        view_memory = cache.get("TreeMemInUse", 0) + cache.get("HeapMemInUse", 0)
        per_view[name] = {
            "cache_hits": view_hits,
            "cache_misses": view_misses,
            "hit_ratio": hit_ratio(view_hits, view_misses),
            "upstream_queries": view_upstream,
            "cache_memory_bytes": view_memory,
        }
        hits += view_hits
        misses += view_misses
        upstream += view_upstream
        timeouts += res.get("QueryTimeout", 0)
        memory += view_memory
        nodes += cache.get("CacheNodes", 0)
    nsstat = raw["nsstat"]
    return {
        "format": raw["format"],
        "bind_version": raw["version"],
        "boot_time": raw["boot_time"],
        "current_time": raw["current_time"],
        "queries": nsstat.get("Requestv4", 0) + nsstat.get("Requestv6", 0),
        "recursive_queries": nsstat.get("QryRecursion", 0),
        "cache_hits": hits,
        "cache_misses": misses,
        "hit_ratio": hit_ratio(hits, misses),
        "upstream_queries": upstream,
        "upstream_timeouts": timeouts,
        "servfail": nsstat.get("QrySERVFAIL", 0),
        "nxdomain": nsstat.get("QryNXDOMAIN", 0),
        "stale_answers": nsstat.get("QryUsedStale", 0),
        "cache_memory_bytes": memory,
        "cache_nodes": nodes,
        "views": per_view,
    }


def hit_ratio(hits, misses):
    total = hits + misses
    return round(float(hits) / total, 4) if total else 0.0


def stats_url(host, port, fmt):
    if ":" in host and not host.startswith("["):
        host = "[%s]" % host
    path = "/json/v1/server" if fmt == "json" else "/xml/v3/server"
    return "http://%s:%d%s" % (host, port, path)


def _http_get(url, timeout):
    if open_url is None:  # pragma: no cover
        raise StatsEndpointError("ansible.module_utils.urls is not available")
    response = open_url(url, timeout=timeout, validate_certs=False, use_proxy=False)
    return response.read().decode("utf-8", "replace")


def fetch(url, timeout, getter=None):
    """GET one statistics document; errors become StatsEndpointError naming the URL and the fix."""
    getter = getter or _http_get
    try:
        return getter(url, timeout)
    except DnsCacheStatsError:
        raise
    # Deliberately broad: open_url's errors come from urllib, http.client, socket, ssl and
    # ansible.module_utils.urls, with no common base (URLError and socket errors are OSError,
    # http.client.HTTPException is not, urls.ConnectionError/SSLValidationError derive from Exception, a bad
    # URL is a ValueError) and they differ across Python versions; every one must become StatsEndpointError.
    except Exception as exc:  # pylint: disable=broad-exception-caught
        code = getattr(exc, "code", None)
        if code == 404:
            raise StatsEndpointError("%s answered 404: this BIND does not serve that format "
                                     "(use format=xml, or build BIND with json-c)" % url)
        if code is not None:
            raise StatsEndpointError("%s answered HTTP %s: is the statistics channel's allow list "
                                     "letting this address in?" % (url, code))
        raise StatsEndpointError("cannot read %s: %s. Is named running, and does named.conf have "
                                 "`statistics-channels { inet ADDRESS port PORT allow { ... }; };` "
                                 "for this address and port?" % (url, exc))


def read_stats(host="127.0.0.1", port=DEFAULT_PORT, fmt="auto", timeout=5, view=None, getter=None):
    """Fetch and summarise. fmt: auto (JSON, then XML when JSON is not served), json or xml."""
    if fmt not in ("auto", "json", "xml"):
        raise ValueError("format must be auto, json or xml, not %r" % fmt)
    tried = ["json", "xml"] if fmt == "auto" else [fmt]
    last_error = None
    for kind in tried:
        url = stats_url(host, port, kind)
        try:
            text = fetch(url, timeout, getter)
        except StatsEndpointError as exc:
            last_error = exc
            if "404" in str(exc) and kind != tried[-1]:
                continue
            raise
        summary = summarize(parse(text, kind), view)
        summary["url"] = url
        return summary
    raise last_error  # pragma: no cover - the loop either returns or raises

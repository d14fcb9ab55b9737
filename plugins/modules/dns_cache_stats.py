#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: dns_cache_stats
short_description: Read the local BIND 9 cache's statistics channel
version_added: 0.1.0
description:
  - Reads the statistics channel of the BIND 9 cache that the P(fleetkeeper.aws.dns_cache#role) role installs
    (C(statistics-channels) on V(127.0.0.1) port V(954) by default) on the managed host, and returns client
    queries, cache hits and misses, the hit ratio, upstream queries sent, SERVFAIL answers and cache memory.
  - The hit ratio is C(QueryHits / (QueryHits + QueryMisses)) from each view's C(cachestats), which BIND counts
    once per client query. C(CacheHits) and C(CacheMisses) count every internal cache lookup and are not used.
  - Upstream queries are the view's resolver C(Queryv4) + C(Queryv6) counters.
  - Counters are totals since BIND started (see RV(boot_time)); compare two readings for rates.
  - Reads JSON (C(/json/v1/server)) and falls back to XML (C(/xml/v3/server)) when BIND was built without JSON
    support.
author:
  - fleetkeeper maintainers (@fleetkeeper)
options:
  host:
    description:
      - Address of the statistics channel, as seen from the managed host.
    type: str
    default: 127.0.0.1
  port:
    description:
      - Port of the statistics channel (the role's C(dns_cache_stats_port)).
    type: int
    default: 954
  format:
    description:
      - Which document to read. V(auto) tries JSON first and uses XML when the server answers 404 for JSON.
    type: str
    choices: [auto, json, xml]
    default: auto
  view:
    description:
      - Report this view only. By default all views are added up, except BIND's internal C(_bind) view.
    type: str
  timeout:
    description:
      - Seconds to wait for the statistics channel.
    type: int
    default: 5
attributes:
  check_mode:
    support: full
    description: Reads only; runs the same in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to diff.
  idempotent:
    support: full
    description: Never changes anything.
notes:
  - Runs on the managed host, because the statistics channel listens on its loopback address only.
seealso:
  - name: BIND 9 statistics
    description: The statistics channel and its counters.
    link: https://bind9.readthedocs.io/en/v9.18.0/reference.html#statistics-channels-block-grammar
"""

EXAMPLES = r"""
- name: Read the cache's figures
  fleetkeeper.aws.dns_cache_stats:
  register: dns_cache

- name: Show the hit ratio
  ansible.builtin.debug:
    msg: "{{ dns_cache.cache_hits }} of {{ dns_cache.cache_hits + dns_cache.cache_misses }} answered from cache ({{ dns_cache.hit_ratio }})"

- name: Statistics on a non-default port, XML only
  fleetkeeper.aws.dns_cache_stats:
    port: 8053
    format: xml
"""

RETURN = r"""
queries:
  description: Client queries received (C(Requestv4) + C(Requestv6)).
  returned: success
  type: int
  sample: 39
recursive_queries:
  description: Client queries that made BIND recurse, that is go upstream (C(QryRecursion)).
  returned: success
  type: int
  sample: 16
cache_hits:
  description: Client queries answered from the cache (C(QueryHits)).
  returned: success
  type: int
  sample: 23
cache_misses:
  description: Client queries the cache could not answer (C(QueryMisses)); includes the stale-data lookup after a failed fetch.
  returned: success
  type: int
  sample: 18
hit_ratio:
  description: RV(cache_hits) / (RV(cache_hits) + RV(cache_misses)), 0.0 when there were none.
  returned: success
  type: float
  sample: 0.561
upstream_queries:
  description: Queries sent to the upstream resolvers (C(Queryv4) + C(Queryv6)).
  returned: success
  type: int
  sample: 16
upstream_timeouts:
  description: Upstream queries that timed out (C(QueryTimeout)).
  returned: success
  type: int
  sample: 0
servfail:
  description: SERVFAIL answers sent to clients (C(QrySERVFAIL)).
  returned: success
  type: int
  sample: 2
nxdomain:
  description: NXDOMAIN answers sent to clients (C(QryNXDOMAIN)).
  returned: success
  type: int
  sample: 6
stale_answers:
  description: Answers served from expired (stale) data (C(QryUsedStale)).
  returned: success
  type: int
  sample: 0
cache_memory_bytes:
  description: Memory the cache uses (C(TreeMemInUse) + C(HeapMemInUse)).
  returned: success
  type: int
  sample: 127985
cache_nodes:
  description: Names in the cache (C(CacheNodes)).
  returned: success
  type: int
  sample: 15
views:
  description: The same figures per view.
  returned: success
  type: dict
  sample: {"_default": {"cache_hits": 23, "cache_misses": 18, "hit_ratio": 0.561, "upstream_queries": 16, "cache_memory_bytes": 127985}}
bind_version:
  description: The BIND version the channel reports.
  returned: success
  type: str
  sample: 9.18.49-1~deb12u3-Debian
boot_time:
  description: When BIND started; the counters count from then.
  returned: success
  type: str
  sample: "2026-11-25T06:28:16.297Z"
current_time:
  description: When the statistics were taken, by BIND's clock.
  returned: success
  type: str
  sample: "2026-11-25T06:28:19.617Z"
format:
  description: Which document was read, V(json) or V(xml).
  returned: success
  type: str
  sample: json
url:
  description: The URL that was read.
  returned: success
  type: str
  sample: http://127.0.0.1:954/json/v1/server
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_stats import DnsCacheStatsError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_stats import read_stats


def main():
    module = AnsibleModule(
        argument_spec=dict(
            host=dict(type="str", default="127.0.0.1"),
            port=dict(type="int", default=954),
            format=dict(type="str", default="auto", choices=["auto", "json", "xml"]),
            view=dict(type="str"),
            timeout=dict(type="int", default=5),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        stats = read_stats(params["host"], params["port"], params["format"], params["timeout"], params["view"])
    except DnsCacheStatsError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, **stats)


if __name__ == "__main__":
    main()

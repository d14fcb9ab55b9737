# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The dns_cache_resolv_conf filter, documented in dns_cache_resolv_conf.yml beside this file; the logic is in
module_utils/dns_cache_resolver.py."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_resolver import ResolverConfigError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_resolver import build_resolv_conf


def _dns_cache_resolv_conf(current, upstream=None, first="127.0.0.1", fallback=None, options=None):
    if options is None:
        options = ["timeout:1", "attempts:2"]
    try:
        return build_resolv_conf(current or "", upstream or "", first=first, fallback=fallback or [],
                                 options=list(options))
    except ResolverConfigError as exc:
        raise AnsibleFilterError("fleetkeeper.aws.dns_cache_resolv_conf: %s" % exc)


class FilterModule(object):
    """fleetkeeper.aws.dns_cache_resolv_conf."""

    def filters(self):
        return {"dns_cache_resolv_conf": _dns_cache_resolv_conf}

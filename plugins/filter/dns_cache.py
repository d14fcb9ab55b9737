# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The dns_cache role's filters (vpc_dns_resolver, dns_cache_resolv_conf, dns_cache_nsswitch), documented in
the .yml file of the same name beside this one."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_resolver import ResolverConfigError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_resolver import build_resolv_conf
from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_resolver import nsswitch_without_resolve
from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_resolver import vpc_dns_resolver


def _vpc_dns_resolver(cidr):
    if isinstance(cidr, (list, tuple)):
        return [_vpc_dns_resolver(item) for item in cidr]
    try:
        return vpc_dns_resolver(cidr)
    except ResolverConfigError as exc:
        raise AnsibleFilterError("fleetkeeper.aws.vpc_dns_resolver: %s" % exc)


def _dns_cache_resolv_conf(current, upstream=None, first="127.0.0.1", fallback=None, options=None):
    if options is None:
        options = ["timeout:1", "attempts:2"]
    try:
        return build_resolv_conf(current or "", upstream or "", first=first, fallback=fallback or [],
                                 options=list(options))
    except ResolverConfigError as exc:
        raise AnsibleFilterError("fleetkeeper.aws.dns_cache_resolv_conf: %s" % exc)


def _dns_cache_nsswitch(text):
    return nsswitch_without_resolve(text or "")


class FilterModule(object):
    """fleetkeeper.aws DNS cache filters."""

    def filters(self):
        return {
            "vpc_dns_resolver": _vpc_dns_resolver,
            "dns_cache_resolv_conf": _dns_cache_resolv_conf,
            "dns_cache_nsswitch": _dns_cache_nsswitch,
        }

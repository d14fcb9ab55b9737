# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The vpc_dns_resolver filter, documented in vpc_dns_resolver.yml beside this file; the logic is in
module_utils/dns_cache_resolver.py."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_resolver import ResolverConfigError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_resolver import vpc_dns_resolver


def _vpc_dns_resolver(cidr):
    if isinstance(cidr, (list, tuple)):
        return [_vpc_dns_resolver(item) for item in cidr]
    try:
        return vpc_dns_resolver(cidr)
    except ResolverConfigError as exc:
        raise AnsibleFilterError("fleetkeeper.aws.vpc_dns_resolver: %s" % exc)


class FilterModule(object):
    """fleetkeeper.aws.vpc_dns_resolver."""

    def filters(self):
        return {"vpc_dns_resolver": _vpc_dns_resolver}

# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The dns_cache_nsswitch filter, documented in dns_cache_nsswitch.yml beside this file; the logic is in
module_utils/dns_cache_resolver.py."""

from __future__ import annotations

from ansible_collections.fleetkeeper.aws.plugins.module_utils.dns_cache_resolver import nsswitch_without_resolve


def _dns_cache_nsswitch(text):
    return nsswitch_without_resolve(text or "")


class FilterModule(object):
    """fleetkeeper.aws.dns_cache_nsswitch."""

    def filters(self):
        return {"dns_cache_nsswitch": _dns_cache_nsswitch}

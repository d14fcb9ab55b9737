# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Resolver-side logic of the dns_cache role, pure and unit-tested.

- ``vpc_dns_resolver``: the Amazon-provided resolver's address in a VPC (the
  base of the VPC's IPv4 CIDR plus two).
- ``build_resolv_conf``: a resolv.conf with the local cache first and the
  host's original nameservers after it. glibc reads at most three
  ``nameserver`` lines and tries them in order (without ``rotate``), so the
  cache is always asked first and the originals only when it does not answer;
  ``timeout:1 attempts:2`` keeps that fallback to about a second.
- ``nsswitch_without_resolve``: the ``hosts:`` line without systemd-resolved's
  NSS module, which would otherwise answer before resolv.conf is read.
"""

from __future__ import annotations

import ipaddress
import re

MAXNS = 3  # glibc's resolver reads at most this many nameserver lines
MANAGED_MARKER = "fleetkeeper.aws.dns_cache"
# Options the role always owns: it sets timeout/attempts itself and never rotates.
OWNED_OPTIONS = ("timeout:", "attempts:", "rotate")


class ResolverConfigError(ValueError):
    """Input the resolver logic cannot use; the message says what to fix."""


def vpc_dns_resolver(cidr):
    """'10.0.0.0/16' -> '10.0.0.2': the VPC (Route 53) resolver for a VPC's primary IPv4 CIDR."""
    if not isinstance(cidr, str):
        raise ResolverConfigError("vpc_dns_resolver expects a VPC CIDR string such as '10.0.0.0/16', got %s %r"
                                  % (type(cidr).__name__, cidr))
    text = cidr.strip()
    if "/" not in text:
        raise ResolverConfigError("%r has no prefix length: give the VPC's CIDR block, such as '10.0.0.0/16'"
                                  % cidr)
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ResolverConfigError("%r is not a CIDR block: %s" % (cidr, exc))
        raise ResolverConfigError("%r has host bits set: the VPC CIDR block starts at %s (did you pass an "
                                  "instance or subnet address?)" % (cidr, loose))
    if network.version != 4:
        raise ResolverConfigError("%r is an IPv6 block: the VPC resolver is found from the VPC's primary IPv4 "
                                  "CIDR (over IPv6 it is fd00:ec2::253 in every VPC)" % cidr)
    if not 16 <= network.prefixlen <= 28:
        raise ResolverConfigError("%r: a VPC CIDR block is between /16 and /28" % cidr)
    return str(network.network_address + 2)


def parse_resolv_conf(text):
    """The parts of a resolv.conf the role keeps: nameservers, search list, options, sortlist."""
    result = {"nameservers": [], "search": [], "options": [], "sortlist": []}
    for raw in (text or "").splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        key, values = fields[0], fields[1:]
        if key == "nameserver" and values:
            result["nameservers"].append(values[0])
        elif key in ("search", "domain"):
            # The last search or domain line wins in glibc.
            result["search"] = values
        elif key == "options":
            result["options"].extend(values)
        elif key == "sortlist":
            result["sortlist"] = values
    return result


def _is_loopback(address):
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def original_nameservers(*texts):
    """Non-loopback nameservers from resolv.conf texts, in order, without duplicates.

    Loopback ones are the cache itself or a local stub (systemd-resolved's
    127.0.0.53), never a fallback for the cache.
    """
    seen = []
    for text in texts:
        for address in parse_resolv_conf(text)["nameservers"]:
            if not _is_loopback(address) and address not in seen:
                seen.append(address)
    return seen


def build_resolv_conf(current, upstream=None, first="127.0.0.1", fallback=None, options=("timeout:1", "attempts:2")):
    """The resolv.conf text: ``first``, then the fallback nameservers, search list, options.

    current: the host's resolv.conf now. upstream: the real upstream list where
    the current file points at a stub (systemd-resolved's
    /run/systemd/resolve/resolv.conf). fallback: explicit fallback nameservers;
    empty or None keeps the host's own. Running it on its own output gives the
    same output (idempotent).
    """
    for address in [first] + list(fallback or []):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ResolverConfigError("nameserver %r is not an IP address (resolv.conf takes addresses only)"
                                      % (address,))
    for option in options or ():
        if option == "rotate":
            raise ResolverConfigError("option 'rotate' would send queries past the cache: leave it out")
    parsed = parse_resolv_conf(current)
    upstream_parsed = parse_resolv_conf(upstream)
    candidates = list(fallback) if fallback else original_nameservers(current, upstream)
    fallbacks = [address for address in candidates if address != first][:MAXNS - 1]
    search = parsed["search"] or upstream_parsed["search"]
    kept = [opt for opt in parsed["options"] if not opt.startswith(OWNED_OPTIONS)]
    merged = list(options or ()) + [opt for opt in kept if opt not in (options or ())]
    lines = [
        "# Written by %s: the local cache first, the original nameservers after it" % MANAGED_MARKER,
        "# as fallback (glibc tries them in order; no 'rotate')."
    ]
    lines.append("nameserver %s" % first)
    lines.extend("nameserver %s" % address for address in fallbacks)
    if search:
        lines.append("search %s" % " ".join(search))
    if parsed["sortlist"]:
        lines.append("sortlist %s" % " ".join(parsed["sortlist"]))
    if merged:
        lines.append("options %s" % " ".join(merged))
    return "\n".join(lines) + "\n"


_RESOLVE_TOKEN = re.compile(r"\s+resolve(\s+\[[^\]]*\])?(?=\s|$)")


def nsswitch_uses_resolve(text):
    """True when the hosts line of nsswitch.conf has systemd-resolved's ``resolve`` module."""
    for line in (text or "").splitlines():
        stripped = line.split("#", 1)[0]
        if stripped.strip().startswith("hosts:"):
            return "resolve" in stripped.split(":", 1)[1].split()
    return False


def nsswitch_without_resolve(text):
    """nsswitch.conf text with ``resolve [..]`` removed from the hosts line (``dns`` added if missing).

    Text whose hosts line has no ``resolve`` comes back unchanged, byte for byte:
    a file whose meaning would not change is not rewritten (not even its spacing)."""
    if not nsswitch_uses_resolve(text):
        return text
    out = []
    for line in (text or "").splitlines():
        if line.strip().startswith("hosts:"):
            head, rest = line.split(":", 1)
            rest = _RESOLVE_TOKEN.sub("", " " + rest)
            if "dns" not in rest.split():
                rest = rest.rstrip() + " dns"
            line = head + ":" + (" " + rest.strip() if rest.strip() else "")
        out.append(line)
    return "\n".join(out) + ("\n" if (text or "").endswith("\n") else "")

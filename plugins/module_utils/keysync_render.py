# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync rendering: the text of the shared account's key file, a user's key file and the sudoers drop-in."""

from __future__ import annotations


MARKER_LINE = "# --- fleetkeeper.aws s3_authorized_keys: lines below are managed; edit above this line ---"

SHARED_HEADER = ("# Managed by fleetkeeper.aws s3_authorized_keys: every line is rewritten at each sync; "
                 "keys added by hand are removed (use static_keys).")


def render_shared(static_lines, managed_lines):
    """The shared account's whole file: the configured static keys, the marker, then the bucket's keys."""
    out = [SHARED_HEADER] + list(static_lines) + [MARKER_LINE] + list(managed_lines)
    return "\n".join(out) + "\n"


SUDOERS_DROPIN = "/etc/sudoers.d/fleetkeeper-keysync"


def render_sudoers(users):
    """The managed sudoers drop-in: one NOPASSWD line per user (synced accounts have no password); "" for none."""
    if not users:
        return ""
    lines = ["# Managed by fleetkeeper.aws keysync: rewritten at each sync from the teams that grant sudo "
             "(bastion_keys_teams); edits are lost."]
    lines.extend("%s ALL=(ALL:ALL) NOPASSWD: ALL" % name for name in sorted(set(users)))
    return "\n".join(lines) + "\n"


def render_user(managed_lines):
    if not managed_lines:
        return ""
    return "\n".join(managed_lines) + "\n"

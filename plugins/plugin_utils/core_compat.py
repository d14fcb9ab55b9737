# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What the oldest supported ansible-core (2.18) needs that later ones do not, in one place.

ansible-core 2.18 reports each deprecated configuration source a plugin's options were read from
(``C.config.DEPRECATED``, drained by ``C.handle_config_noise`` at the end of ``set_options``) with the
entry's ``version``. amazon.aws 9's shared option ``session_token`` dates its deprecated environment
variables (``AWS_SECURITY_TOKEN``, ``EC2_SECURITY_TOKEN``: ``removed_at_date``, no ``version``), so as
soon as one of them is set, as AWX sets ``AWS_SECURITY_TOKEN`` next to ``AWS_SESSION_TOKEN`` for
temporary credentials, core raises ``KeyError: 'version'``: the inventory file is not parsed at all
and ``ansible-inventory --list --export`` fails. ansible-core 2.19 reworked this and has no
``handle_config_noise``; there the plugin uses core's ``set_options`` unchanged.
"""

from __future__ import annotations

from ansible import constants as C

DATED_DEPRECATIONS_BREAK_CORE = hasattr(C, "handle_config_noise")


def report_dated_deprecations(config, display) -> int:
    """Report the pending deprecations that carry a date instead of a version (as later cores do) and take
    them off ``config.DEPRECATED`` before core reads it; return how many were reported."""
    pending = getattr(config, "DEPRECATED", None)
    if not pending:
        return 0
    kept, reported = [], 0
    for name, info in pending:
        if isinstance(info, dict) and "version" not in info:
            message = f"{name} option. {config.get_deprecated_msg_from_config(info)}".replace("\t", "")
            display.deprecated(message, date=info.get("removed_at_date"), collection_name=info.get("collection_name"))
            reported += 1
        else:
            kept.append((name, info))
    pending[:] = kept
    return reported


def set_plugin_options(plugin, display, task_keys=None, var_options=None, direct=None) -> None:
    """``AnsiblePlugin.set_options`` of ansible-core 2.18 with dated deprecations reported first."""
    plugin._options, plugin._origins = C.config.get_plugin_options_and_origins(  # pylint: disable=protected-access
        plugin.plugin_type, plugin._load_name, keys=task_keys, variables=var_options, direct=direct)  # pylint: disable=protected-access
    report_dated_deprecations(C.config, display)
    C.handle_config_noise(display)

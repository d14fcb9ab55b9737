# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:  # pylint: disable=too-few-public-methods
    """Options of every module that selects Auto Scaling groups (plugins/module_utils/autoscaling_groups.py)."""

    DOCUMENTATION = r"""
options:
  names:
    description:
      - Names of the Auto Scaling groups. A name that does not exist fails the task before any change.
      - At least one of O(names) and O(tag_filters) is required; with both, a group must be named and match.
    type: list
    elements: str
    aliases: [asg_names]
  tag_filters:
    description:
      - 'Select groups by tags, as C({key: value}). A value may be a list of accepted values; V("*") or V(null)
        matches any value of the key.'
      - Matching no group at all fails the task.
    type: dict
"""

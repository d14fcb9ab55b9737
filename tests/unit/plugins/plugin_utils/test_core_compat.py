# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""plugin_utils/core_compat.py: dated deprecations reported, versioned ones left to ansible-core."""

from __future__ import annotations

import pytest

from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import core_compat

pytestmark = pytest.mark.compat


class Config:
    def __init__(self, pending):
        self.DEPRECATED = pending  # pylint: disable=invalid-name

    @staticmethod
    def get_deprecated_msg_from_config(info):
        return f"Reason: {info['why']}\t"


class Display:
    def __init__(self):
        self.calls = []

    def deprecated(self, msg, **kwargs):
        self.calls.append((msg, kwargs))


def test_dated_entries_are_reported_and_taken_off_versioned_ones_stay():
    dated = {"removed_at_date": "2024-12-01", "collection_name": "amazon.aws", "why": "old boto"}
    versioned = {"version": "2.20", "why": "core's own"}
    config, display = Config([("AWS_SECURITY_TOKEN", dated), ("[defaults]x", versioned)]), Display()
    assert core_compat.report_dated_deprecations(config, display) == 1
    assert config.DEPRECATED == [("[defaults]x", versioned)]
    expected = ("AWS_SECURITY_TOKEN option. Reason: old boto", {"date": "2024-12-01", "collection_name": "amazon.aws"})
    assert display.calls == [expected]


def test_nothing_pending_is_nothing_reported():
    config, display = Config([]), Display()
    assert core_compat.report_dated_deprecations(config, display) == 0 and display.calls == []

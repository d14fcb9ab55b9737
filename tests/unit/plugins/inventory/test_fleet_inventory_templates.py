# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The inventory gateway's launch template lookup (plugin_utils/fleet_aws.py): batch size and its fallback (a stub EC2 client)."""

from __future__ import annotations

import botocore.exceptions
import pytest

from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import fleet as logic
from ansible_collections.fleetkeeper.aws.plugins.plugin_utils.fleet_aws import FleetGateway

# Inventory output through ansible-core's templating: the compat stage runs it on the oldest core as well.
pytestmark = pytest.mark.compat


class StubEC2:
    """Answers DescribeLaunchTemplates for any ids, refusing batches above ``limit`` with ``code``."""

    def __init__(self, limit=None, code="InvalidParameterValue"):
        self.limit, self.code, self.calls = limit, code, []

    def describe_launch_templates(self, LaunchTemplateIds, NextToken=None):  # noqa: N803 (boto3's names)
        self.calls.append(len(LaunchTemplateIds))
        if self.limit is not None and len(LaunchTemplateIds) > self.limit:
            error = {"Error": {"Code": self.code, "Message": "too many ids"}, "ResponseMetadata": {"HTTPStatusCode": 400}}
            raise botocore.exceptions.ClientError(error, "DescribeLaunchTemplates")
        return {"LaunchTemplates": [{"LaunchTemplateId": i, "LatestVersionNumber": 3, "DefaultVersionNumber": 1}
                                    for i in LaunchTemplateIds]}


IDS = [f"lt-{n:017d}" for n in range(1200)]


def versions_of(ec2, ids, log=None):
    """The template versions the plugin gets from the gateway for ``ids`` in one region."""
    return logic.template_versions(FleetGateway({("ec2", "eu-west-1"): ec2}, log=log).launch_templates("eu-west-1", ids))


def test_one_call_per_thousand_templates():
    ec2 = StubEC2()
    versions = versions_of(ec2, IDS)
    assert ec2.calls == [1000, 200]
    assert versions[IDS[-1]] == {"latest": 3, "default": 1} and len(versions) == 1200


def test_a_refused_large_batch_is_retried_at_the_documented_page_size():
    ec2 = StubEC2(limit=200)
    logged = []
    versions = versions_of(ec2, IDS, log=logged.append)
    assert ec2.calls == [1000] + [200] * 6
    assert len(versions) == 1200
    assert logged == ["DescribeLaunchTemplates refused 1000 ids per call (An error occurred (InvalidParameterValue) when calling "
                      "the DescribeLaunchTemplates operation: too many ids); retrying with 200"]


def test_other_errors_and_small_batches_are_not_retried():
    with pytest.raises(logic.FleetRegionError, match="may not call ec2:DescribeLaunchTemplates") as denied:
        versions_of(StubEC2(limit=0, code="UnauthorizedOperation"), IDS)
    assert (denied.value.region, denied.value.kind, denied.value.code) == ("eu-west-1", "denied", "UnauthorizedOperation")
    ec2 = StubEC2(limit=10)
    with pytest.raises(logic.FleetRegionError, match=r"ec2:DescribeLaunchTemplates failed \(InvalidParameterValue"):
        versions_of(ec2, IDS[:150])
    assert ec2.calls == [150]
    assert logic.TEMPLATE_FALLBACK_BATCH_SIZE == 200

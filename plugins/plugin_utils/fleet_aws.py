# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The ``fleetkeeper.aws.fleet`` inventory's gateway to AWS: its clients, reads, paging and error mapping.

Every AWS call the inventory makes goes through :class:`FleetGateway`: DescribeAutoScalingGroups,
DescribeInstances (by ids and by filters, the bastion lookup included), DescribeLaunchTemplates
(with its batch fallback) and DescribeLifecycleHooks (``module_utils/lifecycle.py``'s
``launch_hook_names``). It pages (``aws_calls.pages``), batches (``aws_calls.chunks``), hooks the fast
XML reader (``fleet_fast.install_xml_reader``) into its clients and turns botocore's exceptions into
:class:`~fleet.FleetRegionError` naming the region and the call. It decides nothing about hosts or
groups: which calls to make, concurrently or not, and what the answers become is the plugin's
(plugins/inventory/fleet.py) and ``fleet.py``'s.
"""

from __future__ import annotations

import contextlib

try:
    import boto3
    import botocore.config
    import botocore.exceptions
except ImportError:
    pass  # reported by the plugin (AWSInventoryBase.require_aws_sdk)

from ansible.module_utils.common.text.converters import to_native

from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import chunks
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_code
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_message
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import http_status
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import pages
from ansible_collections.fleetkeeper.aws.plugins.module_utils.lifecycle import launch_hook_names
from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import fleet as logic
from ansible_collections.fleetkeeper.aws.plugins.plugin_utils import fleet_fast as fast

SERVICES = ("autoscaling", "ec2")


# --- session and clients ---------------------------------------------------------------

class AwsSession:
    """One boto3 session for the whole run, made on first use: its loader reads each service model once.

    Not amazon.aws's client()/all_clients(): client() makes a new boto3 session per client, whose loader
    reads the service models again (six clients, three regions: 1.1 s of CPU against 0.2 s from one
    session), and all_clients() asks DescribeRegions for every region when O(regions) is empty, where the
    plugin reads the one configured region."""

    def __init__(self, profile):
        self.profile = profile
        self._session = None

    def boto3(self):
        if self._session is None:
            try:
                self._session = boto3.session.Session(profile_name=self.profile)
            except botocore.exceptions.BotoCoreError as exc:
                raise logic.FleetConfigError(f"cannot use AWS profile {self.profile!r}: {exc}") from None
        return self._session

    def known_regions(self):
        """Every region botocore knows for EC2 (empty when it cannot tell)."""
        try:
            session = self.boto3()
            known = set()
            for partition in session.get_available_partitions():
                known.update(session.get_available_regions("ec2", partition_name=partition))
            return known
        except (logic.FleetConfigError, botocore.exceptions.BotoCoreError):
            return set()

    def gateway(self, regions, endpoint_url, params, options, log=None):
        """A :class:`FleetGateway` with an autoscaling and an EC2 client per region.

        ``params`` are amazon.aws's connection parameters (``get_aws_connection_info``, credentials included),
        ``options`` the plugin's ``retry_max_attempts``, ``retry_mode``, ``connect_timeout``, ``read_timeout``,
        ``max_concurrency`` and ``fast_parser``."""
        params = dict(params)
        params.pop("profile_name", None)  # the session already uses it
        config = client_config(options, (params.pop("aws_config", None), params.pop("config", None)))
        session = self.boto3()
        try:
            clients = {
                (service, region): session.client(service, region_name=region, endpoint_url=endpoint_url, config=config, **params)
                for service in SERVICES for region in regions
            }
        except (botocore.exceptions.BotoCoreError, ValueError) as exc:
            raise logic.FleetConfigError(f"cannot set up AWS clients: {to_native(exc)}") from None
        if options["fast_parser"]:
            for client in clients.values():
                fast.install_xml_reader(client)
        return FleetGateway(clients, log=log)


def client_config(options, extra=()):
    """botocore's client configuration: retries, timeouts, a connection pool for the plugin's threads."""
    config = botocore.config.Config(
        retries={"total_max_attempts": int(options["retry_max_attempts"]), "mode": options["retry_mode"]},
        connect_timeout=float(options["connect_timeout"]),
        read_timeout=float(options["read_timeout"]),
        max_pool_connections=max(10, int(options["max_concurrency"]) * 2),
        user_agent_extra="fleetkeeper.aws.fleet",
    )
    for more in extra:
        if more is not None:
            config = config.merge(more)
    return config


# --- error mapping -----------------------------------------------------------------------

def failure(region, action, exc):
    """The :class:`~fleet.FleetRegionError` for botocore's ``exc`` raised by ``action`` in ``region``."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = error_code(exc)
        kind = logic.classify_error(code or "Unknown", http_status(exc))
        message = logic.error_message(kind, region, action, code or "Unknown", error_message(exc))
        return logic.FleetRegionError(region, message, kind, code=code)
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionError,
                        botocore.exceptions.ConnectionClosedError)):
        return logic.FleetRegionError(region, logic.error_message("unreachable", region, action, "", to_native(exc)), "unreachable")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return logic.FleetRegionError(
            region, f"no AWS credentials found: set 'profile', 'access_key'/'secret_key' or the AWS_* environment ({exc})",
            "credentials")
    return logic.FleetRegionError(region, logic.error_message("error", region, action, type(exc).__name__, to_native(exc)))


@contextlib.contextmanager
def _mapped(region, action):
    """botocore's exceptions in the block become :func:`failure`'s FleetRegionError."""
    try:
        yield
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise failure(region, action, exc) from None


# --- the gateway -------------------------------------------------------------------------

class FleetGateway:
    """The inventory's AWS reads, per region; thread-safe (botocore clients are), so the plugin may call it from its pools.

    ``clients`` maps ``(service, region)`` to a botocore client (``AwsSession.gateway`` builds them; tests pass stubs).
    Each method raises :class:`~fleet.FleetRegionError` for what AWS or the connection refused."""

    def __init__(self, clients, log=None):
        self.clients = clients
        self._log = log

    def auto_scaling_groups(self, region, request):
        """Every Auto Scaling group of a DescribeAutoScalingGroups ``request``, as AWS gives them, one page at a time."""
        with _mapped(region, "autoscaling:DescribeAutoScalingGroups"):
            for page in pages(self.clients[("autoscaling", region)].describe_auto_scaling_groups, request):
                yield from page.get("AutoScalingGroups", ())

    def instances_by_filters(self, region, filters, action="ec2:DescribeInstances"):
        """Every instance matching EC2 ``filters``, all pages."""
        with _mapped(region, action):
            return self._instances(region, {"Filters": filters, "MaxResults": logic.INSTANCE_PAGE_SIZE})

    def bastion_instances(self, region, bastion):
        """The running instances the ``bastion`` option (``fleet.parse_bastion``) names."""
        return self.instances_by_filters(region, logic.bastion_filters(bastion), "ec2:DescribeInstances (bastion)")

    @staticmethod
    def instance_id_batches(ids):
        """``ids`` sorted, in DescribeInstances batches (1,000 ids each) for :meth:`instances_by_ids`."""
        return chunks(sorted(ids), logic.INSTANCE_BATCH_SIZE)

    def instances_by_ids(self, region, ids):
        """The instances of one DescribeInstances batch of ids; ids EC2 no longer knows are left out."""
        remaining = list(ids)
        with _mapped(region, "ec2:DescribeInstances"):
            while remaining:
                try:
                    return self._instances(region, {"InstanceIds": remaining})
                except botocore.exceptions.ClientError as exc:
                    # An ASG may list an instance EC2 has already forgotten: drop those ids and ask again.
                    if error_code(exc) != "InvalidInstanceID.NotFound":
                        raise
                    missing = logic.missing_instance_ids(error_message(exc))
                    if not missing & set(remaining):
                        raise
                    remaining = [i for i in remaining if i not in missing]
        return []

    def launch_templates(self, region, ids):
        """DescribeLaunchTemplates' entries for the template ``ids``, 1,000 per call (200 if the endpoint refuses that)."""
        with _mapped(region, "ec2:DescribeLaunchTemplates"):
            return self._launch_templates(self.clients[("ec2", region)], ids, logic.TEMPLATE_BATCH_SIZE)

    def launch_hooks(self, region, group_names):
        """({group: sorted launch hook names}, None), or the hooks read so far and the error code once the call is denied."""
        autoscaling = self.clients[("autoscaling", region)]
        hooks = {}
        with _mapped(region, "autoscaling:DescribeLifecycleHooks"):
            for name in group_names:
                try:
                    hooks[name] = launch_hook_names(autoscaling, name)
                except botocore.exceptions.ClientError as exc:
                    code = error_code(exc)
                    if logic.classify_error(code, http_status(exc)) != "denied":
                        raise
                    return hooks, code
        return hooks, None

    def _instances(self, region, request):
        instances = []
        for page in pages(self.clients[("ec2", region)].describe_instances, request):
            for reservation in page.get("Reservations", ()):
                instances.extend(reservation.get("Instances", ()))
        return instances

    def _launch_templates(self, ec2, ids, size):
        entries = []
        try:
            for batch in chunks(list(ids), size):
                for page in pages(ec2.describe_launch_templates, {"LaunchTemplateIds": batch}):
                    entries.extend(page.get("LaunchTemplates", ()))
        except botocore.exceptions.ClientError as exc:
            smaller = logic.smaller_template_batch(min(len(ids), size), error_code(exc))
            if smaller is None:
                raise
            if self._log is not None:
                self._log(f"DescribeLaunchTemplates refused {size} ids per call ({to_native(exc)}); retrying with {smaller}")
            return self._launch_templates(ec2, ids, smaller)
        return entries

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the test endpoint adds to moto for EC2 launch templates: ``SourceVersion``.

moto 5.2's CreateLaunchTemplateVersion ignores ``SourceVersion``: the new version holds only the
``LaunchTemplateData`` sent. Real EC2 starts from the source version and overrides the top-level
fields the request names. The rollers send only the field they change (``IamInstanceProfile``,
``MetadataOptions``), so on bare moto a profile roll-out followed by a metadata roll-out would take
turns dropping each other's field, and neither would ever be idempotent.

The proxy rewrites such a request before moto sees it: it reads the source version from moto
(DescribeLaunchTemplateVersions), serialises its data with botocore's own EC2 serializer (the
request shape of botocore's service model, so the parameter names are the ones a client sends),
keeps the request's parameters for every top-level field it names and the source's for the others,
and drops ``SourceVersion``. Nothing else is emulated.
"""

from __future__ import annotations

import urllib.parse

PREFIX = "LaunchTemplateData."


def top_level_fields(params: dict) -> set:
    """The LaunchTemplateData fields a flat query request names (``LaunchTemplateData.X...`` -> X)."""
    return {key[len(PREFIX):].split(".", 1)[0] for key in params if key.startswith(PREFIX)}


def serialized_data(data: dict) -> dict:
    """Flat EC2 query parameters of ``LaunchTemplateData`` as botocore sends them."""
    import botocore.session  # pylint: disable=import-outside-toplevel
    from botocore.serialize import create_serializer  # pylint: disable=import-outside-toplevel

    model = botocore.session.get_session().get_service_model("ec2")
    operation = model.operation_model("CreateLaunchTemplateVersion")
    request = create_serializer("ec2").serialize_to_request(
        {"LaunchTemplateId": "lt-0", "LaunchTemplateData": data}, operation)
    return {k: v for k, v in request["body"].items() if k.startswith(PREFIX)}


def merge(params: dict, source_data: dict) -> dict:
    """The request's flat parameters with the source version's data filled in, without SourceVersion."""
    named = top_level_fields(params)
    merged = {k: v for k, v in params.items() if k != "SourceVersion"}
    for key, value in serialized_data(source_data).items():
        if key[len(PREFIX):].split(".", 1)[0] not in named:
            merged[key] = value
    return merged


class SourceVersionEmulation:
    """``before(region, operation, params)`` returns a new request body, or None to pass the request on."""

    def __init__(self, upstream_client):
        self._client = upstream_client

    def before(self, region: str, operation: str, params: dict) -> bytes | None:
        if operation != "CreateLaunchTemplateVersion" or not params.get("SourceVersion"):
            return None
        request = {"Versions": [params["SourceVersion"]]}
        if params.get("LaunchTemplateId"):
            request["LaunchTemplateId"] = params["LaunchTemplateId"]
        elif params.get("LaunchTemplateName"):
            request["LaunchTemplateName"] = params["LaunchTemplateName"]
        else:
            return None
        try:
            versions = self._client("ec2", region).describe_launch_template_versions(**request)
        except Exception:  # pylint: disable=broad-exception-caught  # moto answers the original request's error
            return None
        records = versions.get("LaunchTemplateVersions") or []
        if not records:
            return None
        return urllib.parse.urlencode(merge(params, records[0].get("LaunchTemplateData") or {})).encode()

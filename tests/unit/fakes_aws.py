# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""botocore's own exceptions for the unit tests' fake AWS clients: what real code gets from a boto3 client."""

from __future__ import annotations

from botocore.exceptions import ClientError, EndpointConnectionError

# The messages AWS sends with these codes (S3's wording).
MESSAGES = {
    "AccessDenied": "Access Denied",
    "InvalidObjectState": "The operation is not valid for the object's storage class",
    "InternalError": "We encountered an internal error. Please try again.",
    "NoSuchKey": "The specified key does not exist.",
    "PreconditionFailed": "At least one of the pre-conditions you specified did not hold",
    "SlowDown": "Please reduce your request rate.",
}


def client_error(code: str, status: int = 403, operation: str = "ListObjectsV2", message: str | None = None) -> ClientError:
    """A ``ClientError`` as botocore raises it for an AWS error response (``exc.response`` and ``str(exc)`` alike)."""
    response = {"Error": {"Code": code, "Message": message or MESSAGES.get(code, code)},
                "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "FAKE0REQUEST0ID", "HTTPHeaders": {}}}
    return ClientError(response, operation)


def endpoint_unreachable(url: str = "https://keys-bucket.s3.eu-west-1.amazonaws.com/") -> EndpointConnectionError:
    """What botocore raises when the endpoint does not answer at all (no AWS error response, no ``response``)."""
    return EndpointConnectionError(endpoint_url=url)

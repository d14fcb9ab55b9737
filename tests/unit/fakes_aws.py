# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""botocore's own exceptions for the unit tests' fake AWS clients: what real code gets from a boto3 client."""

from __future__ import annotations

import contextlib

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError
from botocore.stub import Stubber

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


class RetryingClient:  # pylint: disable=too-few-public-methods
    """A boto3 client as amazon.aws's retrying wrapper presents it: every call takes ``aws_retry`` (which the client
    underneath must not see), and ``retries`` records (operation, aws_retry) per call."""

    def __init__(self, client):
        self.client = client
        self.retries = []

    def __getattr__(self, name):
        method = getattr(self.client, name)

        def call(aws_retry=False, **kwargs):
            self.retries.append((name, aws_retry))
            return method(**kwargs)
        return call


@contextlib.contextmanager
def stubbed_client(service: str, region: str = "us-east-1"):
    """(RetryingClient over a real boto3 client, its botocore Stubber); every queued answer must be used."""
    client = boto3.client(service, region_name=region, aws_access_key_id="a", aws_secret_access_key="b")
    with Stubber(client) as stub:
        yield RetryingClient(client), stub
        stub.assert_no_pending_responses()

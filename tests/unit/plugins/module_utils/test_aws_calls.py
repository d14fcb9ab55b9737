# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one paginator and error reader (plugins/module_utils/aws_calls.py)."""

from __future__ import annotations

import botocore.exceptions
from hypothesis import given
from hypothesis import strategies as st

from ansible_collections.fleetkeeper.aws.plugins.module_utils import aws_calls


def test_pages_follow_the_token_and_pass_extra_arguments():
    calls = []
    answers = {None: {"Items": [1], "NextToken": "a"}, "a": {"Items": [2], "NextToken": "b"}, "b": {"Items": [3]}}

    def call(**kwargs):
        calls.append(kwargs)
        return answers[kwargs.get("NextToken")]

    request = {"MaxResults": 2}
    assert [p["Items"] for p in aws_calls.pages(call, request, aws_retry=True)] == [[1], [2], [3]]
    assert calls == [{"MaxResults": 2, "aws_retry": True}, {"MaxResults": 2, "NextToken": "a", "aws_retry": True},
                     {"MaxResults": 2, "NextToken": "b", "aws_retry": True}]
    assert request == {"MaxResults": 2}  # the caller's request is not changed


def test_an_empty_token_ends_the_pages():
    assert len(list(aws_calls.pages(lambda **_: {"NextToken": ""}, {}))) == 1


def test_pages_read_the_next_token_under_its_own_name_and_stop_when_the_caller_does():
    calls = []
    answers = {None: {"Keys": [1], "NextContinuationToken": "a"}, "a": {"Keys": [2], "NextContinuationToken": "b"}}

    def call(**kwargs):
        calls.append(kwargs)
        return answers[kwargs.get("ContinuationToken")]

    listing = aws_calls.pages(call, {"Bucket": "b"}, "ContinuationToken", reply_token="NextContinuationToken")
    for page in listing:
        if page["Keys"] == [2]:
            break
    assert calls == [{"Bucket": "b"}, {"Bucket": "b", "ContinuationToken": "a"}]  # no call for the page after "b"


def test_error_readers():
    exc = botocore.exceptions.ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "no"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Op")
    assert (aws_calls.error_code(exc), aws_calls.error_message(exc), aws_calls.http_status(exc)) == \
        ("AccessDenied", "no", 403)
    other = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert (aws_calls.error_code(other), aws_calls.error_message(other), aws_calls.http_status(other)) == ("", "", None)


@given(st.integers(min_value=0, max_value=5000), st.integers(min_value=1, max_value=1000))
def test_chunks_cover_everything_once_within_the_size(count, size):
    items = list(range(count))
    parts = list(aws_calls.chunks(items, size))
    assert [i for part in parts for i in part] == items
    assert all(0 < len(part) <= size for part in parts)

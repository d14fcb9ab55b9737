# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The one paginator, batcher and error reader of the modules, the inventory plugin and the key sync.

Everything else comes from amazon.aws (``AWSRetry`` on the clients, ``is_boto3_error_code``
in ``except`` clauses, ``fail_json_aws`` in modules). Not amazon.aws's instance-profile
association and launch-template helpers (module_utils/ec2.py): they retry ``IncorrectState``
with a jittered backoff of up to minutes, where the roll must fall back from a refused replace
to disassociate + associate at once, and they wrap every error in ``AnsibleEC2Error``, so the
per-code handling below would need the wrapped exception.

This file imports nothing (not even botocore): the bastion_keys role copies it onto hosts next to
the key sync (keysync*.py, see the role's ``__bastion_keys_utils``), which has boto3 there but not
ansible-core or amazon.aws. Keep it that way.
"""

from __future__ import annotations


def pages(call, request, token="NextToken", *, reply_token=None, **kwargs):
    """Every page of a paginated call: ``call(**request, **kwargs)``, then again with the page's ``token``.

    ``reply_token`` names the token in the answer when it differs from the request's (S3 ListObjectsV2:
    ``ContinuationToken`` in, ``NextContinuationToken`` out). A caller that stops early (``break``,
    an exception) makes no further call."""
    request = dict(request)
    reply_token = reply_token or token
    while True:
        page = call(**request, **kwargs)
        yield page
        next_token = page.get(reply_token)
        if not next_token:
            return
        request[token] = next_token


def items(call, request, key, token="NextToken", **kwargs):
    """Every item under ``key`` across the pages of ``call`` (see :func:`pages`)."""
    for page in pages(call, request, token, **kwargs):
        yield from page.get(key) or []


def module_warn(module):
    """The ``warn`` to use in a module built on amazon.aws's ``AnsibleAWSModule``.

    amazon.aws 11 copies every warning into the result on ansible-core 2.19 and later, where core
    already reports them and prints a deprecation for ``warnings`` passed to ``exit_json``: a module
    that warned once showed two messages, one of them a deprecation. Warning through the wrapped
    ``AnsibleModule`` reports each warning once, on every supported core."""
    return getattr(module, "_module", module).warn  # pylint: disable=protected-access


def chunks(items_, size):
    """``items_`` in slices of at most ``size`` (API batch limits)."""
    for start in range(0, len(items_), size):
        yield items_[start:start + size]


def error_code(exc):
    """The AWS error code of a botocore ClientError ("" for anything else)."""
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Code") or "")


def error_message(exc):
    """The AWS error message of a botocore ClientError ("" for anything else)."""
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Message") or "")


def http_status(exc):
    """The HTTP status of a botocore ClientError, or None."""
    response = getattr(exc, "response", None) or {}
    return (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")

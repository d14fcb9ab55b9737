# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""docs/iam/keysync.json allows exactly what the sync does, as the fault proxy saw it."""

from __future__ import annotations

import fnmatch
import json
import os

from lab.ansiblerun import REPO_ROOT, run_module
from lab.fleet import upload_keys
from lab.keysync import ed25519_line

BUCKET = "bastion-keys"
# API operation -> IAM action (S3's authorization reference).
ACTIONS = {"ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket", "GetObject": "s3:GetObject",
           "HeadObject": "s3:GetObject"}


def load_policy(bucket):
    with open(os.path.join(REPO_ROOT, "docs", "iam", "keysync.json"), encoding="utf-8") as handle:
        return json.loads(handle.read().replace("BUCKET_NAME", bucket))


def allowed(policy, action, resource, prefix=None):
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if statement["Effect"] != "Allow" or action not in actions:
            continue
        if not any(fnmatch.fnmatchcase(resource, pattern) for pattern in resources):
            continue
        condition = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if condition is not None and not (prefix is not None and any(fnmatch.fnmatchcase(prefix, p) for p in condition)):
            continue
        return True
    return False


def test_policy_allows_every_call_the_sync_made_and_nothing_more(aws, tmp_path):
    s3 = aws.client("s3")
    upload_keys(s3, BUCKET, {"alice": ed25519_line("a"), "bob": ed25519_line("b")})
    aws.proxy.reset()
    options = {"bucket": BUCKET, "endpoint_url": aws.endpoint_url, "region": "us-east-1",
               "user_backend": "directory", "root": str(tmp_path / "root")}
    assert run_module("fleetkeeper.aws.s3_authorized_keys", options, env=aws.env()).changed
    upload_keys(s3, BUCKET, {"alice": ed25519_line("rotated")}, create=False)
    aws.proxy.reset()  # forget the test's own PutObject
    assert run_module("fleetkeeper.aws.s3_authorized_keys", options, env=aws.env()).changed
    operations = {c.operation for c in aws.proxy.calls()}
    assert operations == {"ListObjectsV2", "GetObject"}
    policy = load_policy(BUCKET)
    for operation in operations:
        action = ACTIONS[operation]
        if action == "s3:ListBucket":
            assert allowed(policy, action, f"arn:aws:s3:::{BUCKET}", prefix="keys/")
        else:
            assert allowed(policy, action, f"arn:aws:s3:::{BUCKET}/keys/alice.pub")
    # Least privilege: no other action, no other prefix, no writes.
    granted = set()
    for statement in policy["Statement"]:
        granted.update(statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]])
    assert granted == {ACTIONS[o] for o in operations}
    assert not allowed(policy, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", prefix="")
    assert not allowed(policy, "s3:GetObject", f"arn:aws:s3:::{BUCKET}/secrets/db.txt")
    assert not allowed(policy, "s3:PutObject", f"arn:aws:s3:::{BUCKET}/keys/alice.pub")

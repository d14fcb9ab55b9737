# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Role README variable tables are what aar-doc generates from meta/argument_specs.yml."""

from __future__ import annotations

import os
import shutil

import pytest

from scripts.role_docs import generate

ROLES = generate.roles()


def test_every_role_is_covered():
    assert sorted(os.path.basename(r) for r in ROLES) == ["bastion_keys", "dns_cache", "instance_profile"]


@pytest.mark.parametrize("role_dir", ROLES, ids=os.path.basename)
def test_readme_table_matches_the_argument_specs(role_dir):
    readme = os.path.join(role_dir, "README.md")
    with open(readme, encoding="utf-8") as handle:
        current = handle.read()
    assert generate.render(role_dir) == current, (
        f"{os.path.relpath(readme, generate.ROOT)} differs from meta/argument_specs.yml: run ./scripts/role-docs.sh"
    )


def test_a_changed_spec_is_caught(tmp_path):
    shutil.copytree(os.path.join(generate.ROOT, "roles", "instance_profile"), tmp_path / "roles" / "instance_profile")
    assert generate.drifted(str(tmp_path)) == {}
    specs = tmp_path / "roles" / "instance_profile" / "meta" / "argument_specs.yml"
    specs.write_text(specs.read_text(encoding="utf-8").replace(
        "description: IAM path of the role and the profile.",
        "description: IAM path of the role and the profile (changed)."), encoding="utf-8")
    drift = generate.drifted(str(tmp_path))
    assert list(drift) == [str(tmp_path / "roles" / "instance_profile" / "README.md")]
    assert "| IAM path of the role and the profile (changed). |" in drift[str(tmp_path / "roles" / "instance_profile" / "README.md")]

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Role README variable tables, generated from each role's meta/argument_specs.yml with aar-doc.

Each roles/<role>/README.md holds its table between ``<!-- BEGIN_ANSIBLE_DOCS -->`` and
``<!-- END_ANSIBLE_DOCS -->``; aar-doc (pinned in requirements-test.txt) renders
variables.md.j2 beside this file into that place and leaves the rest of the README alone.

    ./scripts/role-docs.sh            rewrite every README whose table differs from its specs
    ./scripts/role-docs.sh --check    only list them; exit 1 if there is any

tests/unit/roles/test_role_docs.py runs the check in the unit stage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "variables.md.j2")
BEGIN, END = "<!-- BEGIN_ANSIBLE_DOCS -->", "<!-- END_ANSIBLE_DOCS -->"


def roles(root=ROOT):
    """Every role directory with an argument spec."""
    base = os.path.join(root, "roles")
    return [os.path.join(base, name) for name in sorted(os.listdir(base))
            if os.path.isfile(os.path.join(base, name, "meta", "argument_specs.yml"))]


def aar_doc():
    """The aar-doc command of the running interpreter's environment."""
    beside = os.path.join(os.path.dirname(sys.executable), "aar-doc")
    found = beside if os.access(beside, os.X_OK) else shutil.which("aar-doc")
    if not found:
        raise SystemExit("aar-doc is not installed: it is in requirements-test.txt (source scripts/lib.sh; fk_setup)")
    return found


def render(role_dir):
    """The role's README.md as it should be: its table regenerated from the argument specs."""
    readme = os.path.join(role_dir, "README.md")
    with open(readme, encoding="utf-8") as handle:
        current = handle.read()
    if BEGIN not in current or END not in current:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} block for the variable table")
    with tempfile.TemporaryDirectory(prefix="fk-role-docs-") as scratch:
        target = os.path.join(scratch, "README.md")
        shutil.copyfile(readme, target)
        subprocess.run([aar_doc(), "--output-file", target, "--output-mode", "inject", "--output-template", TEMPLATE,
                        role_dir, "markdown"], check=True, capture_output=True, text=True)
        with open(target, encoding="utf-8") as handle:
            return handle.read()


def drifted(root=ROOT):
    """{README path: regenerated text} for every README whose table differs from its specs."""
    result = {}
    for role_dir in roles(root):
        readme = os.path.join(role_dir, "README.md")
        wanted = render(role_dir)
        with open(readme, encoding="utf-8") as handle:
            if handle.read() != wanted:
                result[readme] = wanted
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="list the READMEs that differ; write nothing")
    args = parser.parse_args(argv)
    changed = drifted()
    for readme, text in changed.items():
        name = os.path.relpath(readme, ROOT)
        if args.check:
            print(f"{name}: variable table differs from meta/argument_specs.yml (run ./scripts/role-docs.sh)")
        else:
            with open(readme, "w", encoding="utf-8") as handle:
                handle.write(text)
            print(f"{name}: regenerated")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())

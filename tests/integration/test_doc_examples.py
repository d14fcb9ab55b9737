# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Every YAML example in README.md, docs/ and the roles' READMEs works when copied.

Playbooks pass `ansible-playbook --syntax-check` with this collection installed; inventory files use only
options the fleet plugin documents (with their types and choices); everything else parses as YAML.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess

import pytest
import yaml

from lab.ansiblerun import BIN_DIR, REPO_ROOT, ansible_env

DOCUMENTS = sorted(["README.md", *(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md"))),
                    *(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "roles", "*", "README.md")))])
FENCE = re.compile(r"^(?P<indent>[ \t]*)```ya?ml[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def examples():
    found = []
    for document in DOCUMENTS:
        with open(os.path.join(REPO_ROOT, document), encoding="utf-8") as handle:
            text = handle.read()
        for match in FENCE.finditer(text):
            indent = match.group("indent")
            body = "\n".join(line[len(indent):] if line.startswith(indent) else line
                             for line in match.group("body").splitlines())
            line = text.count("\n", 0, match.start()) + 1
            found.append(pytest.param(body, id=f"{document}:{line}"))
    return found


EXAMPLES = examples()


def test_the_documents_have_examples():
    assert len(EXAMPLES) >= 15, [param.id for param in EXAMPLES]
    kinds = [kind(yaml.safe_load(param.values[0])) for param in EXAMPLES]
    assert kinds.count("playbook") >= 8 and kinds.count("inventory") >= 3, kinds


def kind(data):
    if isinstance(data, list) and data and all(isinstance(play, dict) for play in data) and all(
            "hosts" in play or "ansible.builtin.import_playbook" in play or "import_playbook" in play for play in data):
        return "playbook"
    if isinstance(data, dict) and str(data.get("plugin", "")).endswith("fleet"):
        return "inventory"
    return "yaml"


@pytest.fixture(scope="module")
def fleet_options():
    doc = subprocess.run([os.path.join(BIN_DIR, "ansible-doc"), "-t", "inventory", "--json", "fleetkeeper.aws.fleet"],
                         capture_output=True, text=True, check=True, env=ansible_env())
    options = json.loads(doc.stdout)["fleetkeeper.aws.fleet"]["doc"]["options"]
    names = {}
    for name, spec in options.items():
        for alias in [name, *(spec.get("aliases") or [])]:
            names[alias] = spec
    return names


TYPES = {"str": str, "string": str, "list": list, "dict": dict, "bool": bool, "boolean": bool, "int": int,
         "integer": int, "float": (int, float), "path": str, "raw": object}


def check_inventory(data, options):
    problems = []
    for key, value in data.items():
        spec = options.get(key)
        if spec is None:
            problems.append(f"{key}: not an option of fleetkeeper.aws.fleet")
            continue
        wanted = TYPES.get(spec.get("type", "str"), object)
        if value is not None and not isinstance(value, wanted):
            problems.append(f"{key}: {value!r} is not of type {spec.get('type')}")
        choices = spec.get("choices")
        if choices and value is not None:
            values = value if isinstance(value, list) else [value]
            choices = list(choices) if not isinstance(choices, dict) else list(choices.keys())
            problems.extend(f"{key}: {item!r} not in {choices}" for item in values if item not in choices)
        suboptions = spec.get("suboptions")
        if suboptions and isinstance(value, dict):
            problems.extend(f"{key}.{sub}: not a suboption" for sub in value if sub not in suboptions)
    return problems


@pytest.mark.parametrize("text", EXAMPLES)
def test_example(text, tmp_path, fleet_options):
    data = yaml.safe_load(text)
    assert data is not None, "empty example"
    what = kind(data)
    if what == "inventory":
        assert data["plugin"] == "fleetkeeper.aws.fleet", data["plugin"]
        problems = check_inventory(data, fleet_options)
        assert not problems, problems
    elif what == "playbook":
        playbook = tmp_path / "example.yml"
        playbook.write_text(text, encoding="utf-8")
        # An inventory with the groups the plays target, as the reader's inventory has them.
        groups = {name for play in data for name in re.split(r"[:,&!]+", str(play.get("hosts", "")))
                  if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name not in ("all", "localhost")}
        inventory = tmp_path / "inventory.ini"
        inventory.write_text("".join(f"[{group}]\n{group}-1 ansible_connection=local\n" for group in sorted(groups))
                             or "localhost ansible_connection=local\n", encoding="utf-8")
        check = subprocess.run([os.path.join(BIN_DIR, "ansible-playbook"), "--syntax-check", "-i", str(inventory),
                                str(playbook)], capture_output=True, text=True, env=ansible_env(), cwd=tmp_path, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "[WARNING]" not in check.stderr, check.stderr

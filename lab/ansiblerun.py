# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run the collection's modules and playbooks through real ansible-playbook processes.

Integration tests use this instead of importing modules: the module then runs
as Ansible runs it (AnsiballZ, argument spec, check mode, diff), against the
endpoint the test hands it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS_PATH = os.path.join(REPO_ROOT, ".build", "collections")
BIN_DIR = os.path.dirname(sys.executable)


def ansible_env(extra: dict | None = None) -> dict:
    """Environment for an ansible-* child process: this collection first, JSON output, no host config."""
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_COLLECTIONS_PATH": COLLECTIONS_PATH,
            "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
            "ANSIBLE_LOCALHOST_WARNING": "False",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "PATH": BIN_DIR + os.pathsep + env.get("PATH", ""),
        }
    )
    env.pop("ANSIBLE_CONFIG", None)
    if extra:
        env.update(extra)
    return env


@dataclass
class TaskResult:
    name: str
    result: dict

    @property
    def changed(self) -> bool:
        return bool(self.result.get("changed"))

    @property
    def failed(self) -> bool:
        return bool(self.result.get("failed"))

    def __getitem__(self, key):
        return self.result[key]

    def get(self, key, default=None):
        return self.result.get(key, default)


@dataclass
class PlaybookRun:
    returncode: int
    stdout: str
    stderr: str
    tasks: list

    def task(self, name: str) -> TaskResult:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task {name!r} in {[t.name for t in self.tasks]}\n{self.stderr}")


def plain(value):
    """ansible-inventory --list marks untrusted strings as {"__ansible_unsafe": ...} on newer cores: unwrap."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


LOCAL_INVENTORY = "localhost ansible_connection=local ansible_python_interpreter={python}\n"


def run_playbook(playbook: str | list, env: dict | None = None, check: bool = False, diff: bool = False,
                 extra_args: list | None = None, inventory: str | None = None) -> PlaybookRun:
    """Run a playbook (YAML text, or a list of plays turned into YAML) and parse the json callback."""
    with tempfile.TemporaryDirectory(prefix="fk-play-") as tmp:
        path = os.path.join(tmp, "play.yml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(playbook if isinstance(playbook, str) else json.dumps(playbook))
        inventory_path = os.path.join(tmp, "inventory")
        with open(inventory_path, "w", encoding="utf-8") as handle:
            handle.write(inventory or LOCAL_INVENTORY.format(python=sys.executable))
        command = [os.path.join(BIN_DIR, "ansible-playbook"), "-i", inventory_path, path]
        if check:
            command.append("--check")
        if diff:
            command.append("--diff")
        command.extend(extra_args or [])
        proc = subprocess.run(command, env=ansible_env(env), capture_output=True, text=True, check=False)
    tasks = []
    try:
        report = json.loads(proc.stdout)
    except ValueError as exc:
        raise AssertionError(f"ansible-playbook printed no JSON (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}") from exc
    for play in report.get("plays", []):
        for task in play.get("tasks", []):
            for _host, result in task.get("hosts", {}).items():
                tasks.append(TaskResult(task["task"]["name"], result))
    return PlaybookRun(proc.returncode, proc.stdout, proc.stderr, tasks)


def run_module(module: str, args: dict, env: dict | None = None, check: bool = False, diff: bool = False) -> TaskResult:
    """Run one module once on localhost and return its result."""
    play = [{
        "hosts": "localhost",
        "gather_facts": False,
        "tasks": [{"name": "under test", module: args, "ignore_errors": True}],
    }]
    run = run_playbook(play, env=env, check=check, diff=diff)
    return run.task("under test")

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Render the dns_cache role's BIND templates as the role does, and check them.

``render_named_conf`` renders the role's own templates with ansible-core's
``template`` lookup in one child process (so ``ansible_managed``, filters and
tests behave as on a host) with the role's defaults, the OS family's vars file
and overrides, into a staging tree laid out like the target's file system. ``checkconf`` runs ``named-checkconf -t STAGE`` on it,
which is the check the role itself runs before installing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import yaml

from lab.ansiblerun import REPO_ROOT, ansible_env

ROLE = os.path.join(REPO_ROOT, "roles", "dns_cache")


def role_vars(family: str, overrides: dict | None = None, version: str = "9.18.49") -> dict:
    """The variables a host of this OS family sees: defaults, vars/main.yml and vars/<family>.yml, overrides."""
    values: dict = {}
    with open(os.path.join(ROLE, "defaults", "main.yml"), encoding="utf-8") as handle:
        values.update(yaml.safe_load(handle))
    for name in ("main", family):
        with open(os.path.join(ROLE, "vars", name + ".yml"), encoding="utf-8") as handle:
            values.update(yaml.safe_load(handle))
    values["__dns_cache_named_version"] = version
    values.update(overrides or {})
    return values


# Run by this Python in a child process: ansible-core's plugin loader installs its collection finder in
# the interpreter that sets it up (as the ansible CLIs do), and the test session's own imports stay untouched.
RENDER = r"""
import json, sys
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import init_plugin_loader, lookup_loader
from ansible.template import Templar
try:  # ansible-core 2.19 and later template only trusted strings; variables from a play are trusted
    from ansible.template import trust_as_template
except ImportError:  # 2.18 templates every string
    trust_as_template = str

def trusted(value):
    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, dict):
        return {key: trusted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [trusted(item) for item in value]
    return value

init_plugin_loader()
loader = DataLoader()
with open(sys.argv[1], encoding="utf-8") as handle:
    items = json.load(handle)
texts = []
for item in items:
    task_vars = trusted(item["vars"])
    lookup = lookup_loader.get("ansible.builtin.template", loader=loader,
                               templar=Templar(loader=loader, variables=task_vars))
    texts.extend(lookup.run([item["src"]], variables=task_vars))
with open(sys.argv[2], "w", encoding="utf-8") as handle:
    json.dump(texts, handle)
"""


def render_named_conf(cases: dict, workdir: str) -> dict:
    """Render named.conf and its options file for each case.

    ``cases`` maps a case name to ``{"family": ..., "overrides": {...}, "version": ..., "absolute": bool,
    "pacing": bool}``. Every file of every case is rendered by ansible-core's ``template`` lookup (the
    engine the template module uses, with its filters, tests and ``ansible_managed``) in one child process,
    each case's variables (defaults, vars/main.yml, vars/<family>.yml, the BIND version, overrides) as the
    lookup's task variables, so expressions among them (vars/main.yml's) are templated when used, against
    each other, as on a host; the texts are then written into the stage. Returns case name -> (stage root,
    main config path inside the stage, variables).
    """
    items = []
    staged = {}
    for name, case in cases.items():
        values = role_vars(case.get("family", "Debian"), case.get("overrides"), case.get("version", "9.18.49"))
        # "absolute": the case's paths are real (temporary) paths: write there, no stage prefix.
        stage = "" if case.get("absolute") else os.path.join(workdir, name)
        # named-checkconf changes into the working directories: they exist on a host.
        for key in ("__dns_cache_directory", "__dns_cache_managed_keys_directory"):
            if values.get(key):
                os.makedirs(stage + values[key], exist_ok=True)
        templates = [("named.conf.j2", "__dns_cache_conf_file"), ("named.conf.options.j2", "__dns_cache_options_file")]
        if case.get("pacing"):
            templates.append(("fleetkeeper-dns-pacing.j2", "__dns_cache_pacing_script"))
        for template, key in templates:
            items.append({"src": os.path.join(ROLE, "templates", template), "dest": stage + values[key], "vars": values})
        staged[name] = (stage, values["__dns_cache_conf_file"], values)
    request, answer = os.path.join(workdir, "render-request.json"), os.path.join(workdir, "render-answer.json")
    with open(request, "w", encoding="utf-8") as handle:
        json.dump(items, handle)
    run = subprocess.run([sys.executable, "-c", RENDER, request, answer], capture_output=True, text=True,
                         check=False, env=ansible_env())
    if run.returncode != 0:
        raise AssertionError("rendering failed:\n%s\n%s" % (run.stdout, run.stderr))
    with open(answer, encoding="utf-8") as handle:
        texts = json.load(handle)
    assert len(texts) == len(items)
    for item, text in zip(items, texts):
        os.makedirs(os.path.dirname(item["dest"]), exist_ok=True)
        with open(item["dest"], "w", encoding="utf-8") as handle:
            handle.write(text)
    return staged


def checkconf(stage: str, main_conf: str, checkconf_bin: str | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """named-checkconf on the staged tree as it will be loaded (chrooted into the stage, as the role does).

    ``checkconf_bin``/``env``: another BIND's checker, such as 9.20's unpacked by lab.dnsservers.
    """
    binary = checkconf_bin or shutil.which("named-checkconf") or "/usr/bin/named-checkconf"
    return subprocess.run([binary, "-t", stage, main_conf], capture_output=True, text=True, check=False, env=env)


def read_staged(stage: str, path: str) -> str:
    with open(stage + path, encoding="utf-8") as handle:
        return handle.read()


class CacheServer:
    """named configured from the role's templates (Debian layout, paths moved into workdir), in a namespace.

    ``root``: the unpacked BIND to run (dnsservers.SERVER_ROOT, bookworm's, by default; dnsservers.BPO_ROOT
    for 9.20 from bookworm-backports); the templates are rendered for that root's ``named -v``, as the role
    renders them for the installed version. ``wrapper``: a command prefix such as ``("taskset", "-c", "0")``.
    """

    def __init__(self, ns, workdir: str, overrides: dict | None = None, threads: int = 1, port: int = 53,
                 root: str | None = None, wrapper: tuple = (), pacing: bool = False):
        from lab import dnsservers

        root = root or dnsservers.SERVER_ROOT
        self.ns, self.dir, self.port = ns, workdir, port
        os.makedirs(os.path.join(workdir, "cache"), exist_ok=True)
        values = {
            "__dns_cache_conf_file": os.path.join(workdir, "named.conf"),
            "__dns_cache_options_file": os.path.join(workdir, "named.conf.options"),
            "__dns_cache_directory": os.path.join(workdir, "cache"),
            "__dns_cache_pid_file": os.path.join(workdir, "cache", "named.pid"),
            "__dns_cache_session_keyfile": os.path.join(workdir, "cache", "session.key"),
            "dns_cache_port": port,
        }
        if pacing:
            # The role's pacing script, run in the namespace as its unit runs it on a host (``ip``/``tc`` act
            # on the namespace only); BIND is configured as the role configures it where pacing is on.
            values.update({"__dns_cache_pacing_script": os.path.join(workdir, "fleetkeeper-dns-pacing"),
                           "__dns_cache_pacing_state_dir": os.path.join(workdir, "pacing-state"),
                           "__dns_cache_pacing_active": True, "dns_cache_upstream_pacing": True})
        values.update(overrides or {})
        version = dnsservers.named_version(root).split("-")[0]
        staged = render_named_conf({"cache": {"family": "Debian", "overrides": values, "version": version,
                                              "absolute": True, "pacing": pacing}}, workdir)
        self.pacing = values["__dns_cache_pacing_script"] if pacing else None
        _stage, self.conf, self.values = staged["cache"]
        self.log = os.path.join(workdir, "named.log")
        self.argv = [*wrapper, dnsservers.binary_path("named", root), "-g", "-n", str(threads), "-c", self.conf]
        self.env = dnsservers.server_env(root)
        self.start()

    def start(self) -> None:
        """Start named on the rendered configuration (again after stop(): an empty cache, same files)."""
        from lab import dnsservers

        if self.pacing:
            self.ns.run(["bash", self.pacing, "start"])
        self.proc = self.ns.popen(self.argv, env=self.env,
                                  stdout=open(self.log, "w", encoding="utf-8"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT)
        try:
            dnsservers.wait_udp_dns(self.ns, "127.0.0.1", self.port, "localhost.")
        except dnsservers.DnsServerError as exc:
            self.stop()
            with open(self.log, encoding="utf-8", errors="replace") as handle:
                raise dnsservers.DnsServerError("%s; named's log ends:\n%s" % (exc, handle.read()[-2000:])) from exc

    def stop(self) -> None:
        self.ns.stop(self.proc)
        if self.pacing:
            self.ns.run(["bash", self.pacing, "stop"])


def run_playbook_in_netns(ns, play: list):
    """ansible-playbook (json callback) on localhost inside a network namespace; returns a PlaybookRun."""
    import json
    import sys
    import tempfile

    from lab.ansiblerun import BIN_DIR, PlaybookRun, TaskResult, ansible_env

    with tempfile.TemporaryDirectory(prefix="fk-dns-play-") as tmp:
        path = os.path.join(tmp, "play.yml")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(play, handle)
        inventory = os.path.join(tmp, "inventory")
        with open(inventory, "w", encoding="utf-8") as handle:
            handle.write("localhost ansible_connection=local ansible_python_interpreter=%s\n" % sys.executable)
        proc = subprocess.run(ns.cmd([os.path.join(BIN_DIR, "ansible-playbook"), "-i", inventory, path]),
                              env=ansible_env(), capture_output=True, text=True, check=False)
    report = json.loads(proc.stdout)
    tasks = [TaskResult(task["task"]["name"], result)
             for play_report in report.get("plays", []) for task in play_report.get("tasks", [])
             for _host, result in task.get("hosts", {}).items()]
    return PlaybookRun(proc.returncode, proc.stdout, proc.stderr, tasks)

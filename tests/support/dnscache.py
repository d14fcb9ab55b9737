# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Render the dns_cache role's BIND templates as the role does, and check them.

``render_named_conf`` runs one ansible-playbook on localhost that renders the
role's own templates with Ansible's template engine (so ``ansible_managed``,
filters and tests behave as on a host) with the role's defaults, the OS
family's vars file and overrides, into a staging tree laid out like the
target's file system. ``checkconf`` runs ``named-checkconf -t STAGE`` on it,
which is the check the role itself runs before installing.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import yaml

from tests.support.ansiblerun import REPO_ROOT, run_playbook

ROLE = os.path.join(REPO_ROOT, "roles", "dns_cache")


def role_vars(family: str, overrides: dict | None = None, version: str = "9.18.49") -> dict:
    """The variables a host of this OS family sees: defaults, vars/<family>.yml, overrides."""
    values: dict = {}
    with open(os.path.join(ROLE, "defaults", "main.yml"), encoding="utf-8") as handle:
        values.update(yaml.safe_load(handle))
    with open(os.path.join(ROLE, "vars", family + ".yml"), encoding="utf-8") as handle:
        values.update(yaml.safe_load(handle))
    values["__dns_cache_named_version"] = version
    values.update(overrides or {})
    return values


def render_named_conf(cases: dict, workdir: str) -> dict:
    """Render named.conf and its options file for each case.

    ``cases`` maps a case name to ``{"family": ..., "overrides": {...}, "version": ..., "absolute": bool}``.
    All cases render in one ansible-playbook run through the ``template`` lookup (the
    engine the template module uses, with ``ansible_managed``); the texts are
    then written into the stage. Returns case name -> (stage root, main config
    path inside the stage, variables).
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
        for template, key in (("named.conf.j2", "__dns_cache_conf_file"),
                              ("named.conf.options.j2", "__dns_cache_options_file")):
            items.append({"src": os.path.join(ROLE, "templates", template), "dest": stage + values[key],
                          "vars": values})
        staged[name] = (stage, values["__dns_cache_conf_file"], values)
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": [{
        "name": "render",
        "ansible.builtin.debug": {
            "msg": "{{ lookup('ansible.builtin.template', item.src, template_vars=item.vars) }}"},
        "loop": items,
        "loop_control": {"label": "{{ item.dest }}"},
    }]}]
    run = run_playbook(play)
    if run.returncode != 0:
        raise AssertionError("rendering failed:\n%s\n%s" % (run.stdout, run.stderr))
    results = run.task("render")["results"]
    for item, result in zip(items, results):
        os.makedirs(os.path.dirname(item["dest"]), exist_ok=True)
        with open(item["dest"], "w", encoding="utf-8") as handle:
            handle.write(result["msg"])
    return staged


def checkconf(stage: str, main_conf: str, checkconf_bin: str | None = None) -> subprocess.CompletedProcess:
    """named-checkconf on the staged tree as it will be loaded (chrooted into the stage, as the role does)."""
    binary = checkconf_bin or shutil.which("named-checkconf") or "/usr/bin/named-checkconf"
    return subprocess.run([binary, "-t", stage, main_conf], capture_output=True, text=True, check=False)


def read_staged(stage: str, path: str) -> str:
    with open(stage + path, encoding="utf-8") as handle:
        return handle.read()

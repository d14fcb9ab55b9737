# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Per-run state files and the rule that says when a run is stale.

Every run keeps ``<cache>/runs/<run id>/state.json``. The launcher writes each
name into it *before* creating the thing (namespace, veth, mount, process), so
a run killed at any point can be cleaned up from its state file alone, and
clean-up touches only what a state file names.
"""

from __future__ import annotations

import json
import os
import tempfile

# Molecule subcommands that destroy their instances at the end: when such a
# molecule process is gone, nobody will ever destroy the run.
SELF_DESTROYING_COMMANDS = ("test",)
MOLECULE_SUBCOMMANDS = ("check", "cleanup", "converge", "create", "dependency", "destroy", "idempotence",
                        "login", "prepare", "reset", "side-effect", "syntax", "test", "verify")


def process_identity(pid: int) -> dict | None:
    """``{pid, start}`` where start is the kernel's start time (clock ticks since boot):
    together they name one process, even after the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return {"pid": pid, "start": int(fields[19])}


def alive(identity) -> bool:
    """Is the process the identity names still running (and not a zombie)?"""
    if not identity:
        return False
    current = process_identity(identity["pid"])
    if current is None or current["start"] != identity.get("start"):
        return False
    try:
        with open(f"/proc/{identity['pid']}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def staleness(state: dict, is_alive=alive) -> str | None:
    """Why a run is stale (nothing will ever destroy it), or None if it is live.

    * still being created: live while its creating process runs;
    * its service process (apt proxy and relays) is gone: the run cannot work;
    * it was created by ``molecule test`` and that molecule process is gone: the
      job was killed before its destroy step.
    A run created by ``molecule create`` outlives that command on purpose
    (converge, login, verify come later) and stays until ``molecule destroy``.
    """
    phase = state.get("phase")
    if phase == "creating":
        if is_alive(state.get("creator")):
            return None
        return "its create step died before finishing"
    if phase == "destroying":
        if is_alive(state.get("destroyer")):
            return None
        return "its destroy step died before finishing"
    daemon = state.get("daemon")
    if not is_alive(daemon):
        return "its service process (apt proxy, relays) is gone"
    owner = state.get("owner") or {}
    if owner.get("command") in SELF_DESTROYING_COMMANDS and not is_alive(owner):
        return f"the `molecule {owner['command']}` that owned it (pid {owner['pid']}) is gone"
    return None


def find_molecule_owner(pid: int | None = None) -> dict | None:
    """The nearest ancestor that is a ``molecule`` process, with its subcommand."""
    pid = pid or os.getpid()
    seen = 0
    while pid > 1 and seen < 64:
        seen += 1
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
            with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return None
        command = molecule_command(argv)
        if command is not None:
            identity = process_identity(pid) or {"pid": pid, "start": None}
            return {**identity, "command": command, "argv": argv[:12]}
        pid = ppid
    return None


def molecule_command(argv) -> str | None:
    """``test`` for ``.../molecule test -s x`` or ``python -m molecule test``; None if not molecule."""
    for index, arg in enumerate(argv[:3]):
        base = os.path.basename(arg)
        is_molecule = base == "molecule" or (arg == "molecule" and index > 0 and argv[index - 1] == "-m")
        if is_molecule:
            for word in argv[index + 1:]:
                if word in MOLECULE_SUBCOMMANDS:
                    return word
            return ""
    return None


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save(path: str, state: dict) -> None:
    directory = os.path.dirname(path)
    fd, temp = tempfile.mkstemp(prefix=".state-", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Command line of the test-host harness (run from the repository root as root).

    python -m lab.hosts create        # Molecule's create step (reads MOLECULE_* variables)
    python -m lab.hosts destroy       # Molecule's destroy step
    python -m lab.hosts list          # runs, their owners and whether they are stale
    python -m lab.hosts cleanup [--all]
    python -m lab.hosts build-image [--release bookworm|trixie|all] | prune-images
    python -m lab.hosts probe --ephemeral-dir D --host private --port 22

See docs/testhosts.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import yaml

from lab.hosts import image as imagemod
from lab.hosts import launcher, paths, teardown
from lab.hosts import state as runstate


def scenario_settings(molecule_file: str) -> dict:
    """The parts of a scenario's molecule.yml the harness reads."""
    with open(molecule_file, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    group_vars = (((data.get("provisioner") or {}).get("inventory") or {}).get("group_vars") or {})
    all_vars = group_vars.get("all") or {}
    aws = all_vars.get("testhosts_aws_endpoint", False)
    if not isinstance(aws, bool):
        raise SystemExit(f"{molecule_file}: testhosts_aws_endpoint must be true or false, not {aws!r}")
    name = (data.get("scenario") or {}).get("name") or os.path.basename(os.path.dirname(os.path.abspath(molecule_file)))
    return {"platforms": data.get("platforms") or [], "aws_endpoint": aws, "scenario": name}


def _env(name: str, value):
    if value:
        return value
    found = os.environ.get(name)
    if not found:
        raise SystemExit(f"pass the option or set {name} (Molecule sets it for its playbooks)")
    return found


def cmd_create(args) -> int:
    settings = scenario_settings(_env("MOLECULE_FILE", args.molecule_file))
    ephemeral = _env("MOLECULE_EPHEMERAL_DIRECTORY", args.ephemeral_dir)
    instance_config = args.instance_config or os.environ.get("MOLECULE_INSTANCE_CONFIG")
    try:
        variables = launcher.create(settings["platforms"], ephemeral, instance_config, settings["scenario"],
                                    aws_endpoint=args.aws_endpoint or settings["aws_endpoint"])
    except launcher.LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"run_id": variables["testhosts_run_id"], "timings": variables["testhosts_timings"],
                      "hosts": variables["testhosts_addresses"]}))
    return 0


def cmd_destroy(args) -> int:
    if args.run_id:
        problems = teardown.destroy_run(args.run_id, reason=args.reason)
    else:
        ephemeral = _env("MOLECULE_EPHEMERAL_DIRECTORY", args.ephemeral_dir)
        instance_config = args.instance_config or os.environ.get("MOLECULE_INSTANCE_CONFIG")
        problems = teardown.destroy(ephemeral, instance_config)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_list(_args) -> int:
    for run_id, st in teardown.list_runs():
        if st is None:
            print(f"{run_id}  (no state file)")
            continue
        reason = runstate.staleness(st)
        owner = st.get("owner") or {}
        print(f"{run_id}  {st.get('phase'):10} scenario={st.get('scenario')} public={st.get('public_subnet')} "
              f"owner={owner.get('pid')}:{owner.get('command')} {'STALE: ' + reason if reason else 'live'}")
    return 0


def cmd_cleanup(args) -> int:
    cleaned = teardown.cleanup_stale(everything=args.all)
    for run_id, reason, problems in cleaned:
        print(f"{run_id}: {reason}" + (f" (problems: {problems})" if problems else ""))
    return 1 if any(problems for _run, _reason, problems in cleaned) else 0


def cmd_build_image(args) -> int:
    from lab.hosts.aptproxy import AptProxy  # pylint: disable=import-outside-toplevel

    releases = imagemod.RELEASES if args.release == "all" else [args.release]
    with AptProxy(paths.apt_cache_dir()) as proxy:
        for release in releases:
            path = imagemod.ensure_image(proxy_url=proxy.url, release=release)
            print(json.dumps({"path": path, **imagemod.image_info(path)}, indent=2))
    return 0


def cmd_prune_images(_args) -> int:
    for name in imagemod.prune_images():
        print(f"removed {name}")
    return 0


def probe(address: str, port: int, device: str | None = None, timeout: float = 3.0) -> str:
    """Try a TCP connection from the controller; returns 'open', 'refused', 'timeout' or 'unreachable'.

    With ``device`` the socket is bound to that interface (SO_BINDTODEVICE): the
    kernel then sends even to an address it has no route for out of that link,
    which is the only way the controller could ever reach a test network."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.connect((address, port))
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, socket.timeout):
        return "timeout"
    except OSError as exc:
        return f"unreachable ({exc.strerror})"
    finally:
        sock.close()


def cmd_probe(args) -> int:
    """Can the controller reach a host on each of its addresses? JSON report for verify steps."""
    ephemeral = _env("MOLECULE_EPHEMERAL_DIRECTORY", args.ephemeral_dir)
    with open(os.path.join(ephemeral, "testhosts.yml"), encoding="utf-8") as handle:
        variables = yaml.safe_load(handle)
    run_id = variables["testhosts_run_id"]
    st = runstate.load(os.path.join(paths.run_dir(run_id), "state.json"))
    links = st.get("root_links", [])
    host = variables["testhosts_hosts"][args.host]
    report = {"host": args.host, "port": args.port, "controller_links": links, "addresses": {}}
    for network, address in host["addresses"].items():
        started = time.monotonic()
        entry = {"routed_via_harness": launcher_route_device(address) in links}
        entry["via_route"] = probe(address, args.port, timeout=args.timeout) if entry["routed_via_harness"] else "no route into any test network"
        entry["via_harness_links"] = {link: probe(address, args.port, device=link, timeout=args.timeout)
                                      for link in links}
        entry["seconds"] = round(time.monotonic() - started, 2)
        report["addresses"][network] = entry
    print(json.dumps(report, indent=2))
    return 0


def launcher_route_device(address: str) -> str | None:
    result = teardown.sh("ip", "-j", "route", "get", address, check=False)
    try:
        return json.loads(result.stdout)[0].get("dev")
    except (ValueError, IndexError, KeyError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.hosts", description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create the hosts of a Molecule scenario")
    create.add_argument("--molecule-file")
    create.add_argument("--ephemeral-dir")
    create.add_argument("--instance-config")
    create.add_argument("--aws-endpoint", action="store_true", help="also start the AWS endpoint")
    create.set_defaults(func=cmd_create)
    destroy = sub.add_parser("destroy", help="destroy a scenario's hosts (or one run by id)")
    destroy.add_argument("--ephemeral-dir")
    destroy.add_argument("--instance-config")
    destroy.add_argument("--run-id")
    destroy.add_argument("--reason", default="destroy")
    destroy.set_defaults(func=cmd_destroy)
    sub.add_parser("list", help="list runs").set_defaults(func=cmd_list)
    cleanup = sub.add_parser("cleanup", help="destroy stale runs")
    cleanup.add_argument("--all", action="store_true", help="destroy every run, live or not")
    cleanup.set_defaults(func=cmd_cleanup)
    build = sub.add_parser("build-image", help="build a release's image if its recipe changed")
    build.add_argument("--release", choices=[*imagemod.RELEASES, "all"], default=imagemod.DEFAULT_RELEASE,
                       help=f"Debian release (default {imagemod.DEFAULT_RELEASE}; all: every release)")
    build.set_defaults(func=cmd_build_image)
    sub.add_parser("prune-images", help="remove images of old recipes").set_defaults(func=cmd_prune_images)
    probe_parser = sub.add_parser("probe", help="try to reach a host's addresses from the controller")
    probe_parser.add_argument("--ephemeral-dir")
    probe_parser.add_argument("--host", required=True)
    probe_parser.add_argument("--port", type=int, default=22)
    probe_parser.add_argument("--timeout", type=float, default=3.0)
    probe_parser.set_defaults(func=cmd_probe)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the test-host harness needs root (namespaces, mounts, systemd-nspawn)", file=sys.stderr)
        return 1
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

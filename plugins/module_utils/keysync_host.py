# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync, host-side entry point (run by the role's systemd timer or cron job).

The role copies this file and its siblings (aws_calls.py and the keysync*.py files:
the role's ``__bastion_keys_utils`` lists them) unchanged onto the host, below
/usr/local/lib/fleetkeeper-keysync/ansible_collections/fleetkeeper/aws/plugins/module_utils/,
and installs /usr/local/sbin/fleetkeeper-keysync, which puts that directory on
sys.path and calls ``main()``: the host runs the very code the module runs.

Credentials come from boto3's default chain (the instance profile on EC2);
``region`` and ``endpoint_url`` come from the JSON configuration file. Output
goes to stdout/stderr, which systemd sends to the journal.

Exit status: 0 done; 1 the sync failed before any change (listing, fail-closed
check, unsafe lock or state path), or it ran but one or more users failed
(each named with the tool's message; every other change was applied);
2 bad configuration; 75 another run holds the lock.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    ConfigError,
    KeySyncConfig,
    KeySyncError,
    LockError,
)
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_s3 import sync
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import make_backend

DEFAULT_CONFIG = "/etc/fleetkeeper/keysync.json"
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL


def make_s3_client(config):
    """boto3's default credential chain; retries in botocore's standard mode."""
    try:
        import boto3  # pylint: disable=import-outside-toplevel
        from botocore.config import Config  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ConfigError("boto3 is not installed on this host (Debian: python3-boto3)") from None
    session = boto3.session.Session()
    return session.client(
        "s3",
        region_name=config.region,
        endpoint_url=config.endpoint_url,
        config=Config(retries={"mode": "standard", "max_attempts": config.max_attempts}, connect_timeout=5, read_timeout=20),
    )


def load_config(path):
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (IOError, OSError) as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc)) from exc
    except ValueError as exc:
        raise ConfigError("%s is not valid JSON: %s" % (path, exc)) from exc
    if not isinstance(data, dict):
        raise ConfigError("%s must hold a JSON object" % path)
    # Keys starting with "_" are notes (the role writes "_managed"), not options.
    return KeySyncConfig(**dict((k, v) for k, v in data.items() if not k.startswith("_")))


# syslog priorities: under systemd (JOURNAL_STREAM set) a "<N>" prefix gives the journal entry that priority.
ERR = 3
WARNING = 4


def _say(stream, message, priority=None):
    prefix = "<%d>" % priority if priority is not None and os.environ.get("JOURNAL_STREAM") else ""
    stream.write("%sfleetkeeper-keysync: %s\n" % (prefix, message))
    stream.flush()


def stale_message(stale):
    since = ("last good sync %s" % stale["last_success"]) if stale.get("last_success") else "no good sync recorded"
    text = ("STALE: revocations are not being applied: %s, %s s ago, more than max_sync_age %d s"
            % (since, stale["age"], stale["max_sync_age"]))
    if stale.get("locked"):
        text += "; stale_action lock locked: %s" % ", ".join(stale["locked"])
    return text


def summarise(result):
    parts = [
        "listed %d objects (%d list, %d get requests), %d valid" % (
            result["objects"]["listed"], result["requests"]["list"], result["requests"]["get"],
            result["objects"]["candidates"]),
    ]
    for label, key in (("created", "users_created"), ("unlocked", "users_unlocked"),
                       ("locked", "users_locked"), ("sessions ended", "users_sessions_ended"),
                       ("removed", "users_removed"), ("locked by an administrator, left locked",
                                                      "users_locked_by_admin")):
        if result[key]:
            parts.append("%s: %s" % (label, ", ".join(result[key])))
    if result["keys_added"] or result["keys_removed"]:
        parts.append("keys +%d -%d" % (len(result["keys_added"]), len(result["keys_removed"])))
    if result["users_pending_removal"]:
        parts.append("missing (not yet locked): %s" % ", ".join(
            "%s (%d run(s))" % item for item in sorted(result["users_pending_removal"].items())))
    if result["failures"]:
        parts.append("FAILED for: %s" % ", ".join(sorted(set(f["user"] for f in result["failures"]))))
    parts.append("changed" if result["changed"] else "no change")
    return "; ".join(parts)


def failure_lines(result):
    """One line per failed user step: 'user: action: tool message'."""
    return ["%s: %s: %s" % (item["user"], item["action"], item["message"]) for item in result.get("failures", [])]


def main(argv=None, s3_factory=make_s3_client, stdout=None, stderr=None):
    """Run once; returns the exit status (the installed script passes it to sys.exit)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = argparse.ArgumentParser(prog="fleetkeeper-keysync",
                                     description="Sync SSH keys from s3://BUCKET/PREFIX/<user>.pub to local users.")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="JSON configuration (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="report what would change, change nothing")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    parser.add_argument("--validate-config", action="store_true",
                        help="only check the configuration file (used by the role before installing it)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        config = load_config(args.config)
        if args.validate_config:
            _say(stdout, "configuration %s is valid" % args.config)
            return 0
        backend = make_backend(config)
        # With --json, stdout carries only the result; progress goes to stderr.
        progress = stderr if args.json else stdout
        result = sync(config, s3_factory(config), backend, check_mode=args.check,
                      log=lambda message: _say(progress, message))
    except ConfigError as exc:
        _say(stderr, "configuration error: %s" % exc, ERR)
        return EXIT_CONFIG
    except LockError as exc:
        _say(stderr, "skipped: %s" % exc, WARNING)
        return EXIT_LOCKED
    except KeySyncError as exc:
        _say(stderr, "error: %s" % exc, ERR)
        if getattr(exc, "stale", None):
            _say(stderr, stale_message(exc.stale), ERR)
        return EXIT_FAILED
    except OSError as exc:
        _say(stderr, "error: %s; nothing more was done" % exc, ERR)
        return EXIT_FAILED
    for item in result["rejected"]:
        where = item["object"] + (":%s" % item["line"] if item["line"] else "")
        _say(stderr, "warning: %s: %s" % (where, item["reason"]), WARNING)
    for line in failure_lines(result):
        _say(stderr, "error: user %s" % line, ERR)
    if result.get("stale"):  # check mode, or a run whose revocations failed
        _say(stderr, stale_message(result), ERR)
    result["elapsed"] = round(time.monotonic() - start, 3)
    if args.json:
        stdout.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        _say(stdout, "%s%s in %.2fs" % ("(check) " if args.check else "", summarise(result), result["elapsed"]))
    return EXIT_FAILED if result["failures"] or result.get("stale") else 0

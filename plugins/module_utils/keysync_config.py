# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync configuration: the option table (KEYSYNC_OPTIONS), KeySyncConfig and its validation.

The module's argument_spec and the host's JSON configuration both come from the one option table here.
"""

from __future__ import annotations

import re

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import ConfigError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import KNOWN_OPTIONS, VALUE_OPTIONS, KeyLineError, parse_key_line


# --------------------------------------------------------------------------
# Usernames

# Always used with fullmatch(): "$" would also match before a final newline.
USERNAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# Accounts Debian, RHEL, Amazon Linux and Ubuntu images create, plus cloud-init defaults.
DEFAULT_DENY_USERS = frozenset([
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy",
    "www-data", "backup", "list", "irc", "gnats", "nobody", "nogroup", "sshd", "messagebus",
    "systemd-network", "systemd-resolve", "systemd-timesync", "systemd-coredump", "_apt",
    "polkitd", "adm", "shutdown", "halt", "operator", "ftp", "chrony", "ntp", "postfix", "dbus",
    "admin", "ec2-user", "ubuntu", "debian", "centos", "fedora", "cloud-user", "ssm-user",
    "wheel", "sudo", "staff", "users",
])
PER_USER = "per_user"
TEAM_GRANT_KEYS = ("sudo", "groups")
# The team manifest beside the key objects (never a key object: only ``.pub`` objects are keys).
TEAMS_MANIFEST = "_teams.json"
MAX_TEAMS_MANIFEST_BYTES = 4 * 1024 * 1024
SHARED_USER = "shared_user"
REMOVAL_ACTIONS = ("lock", "remove", "keep")
STALE_ACTIONS = ("none", "lock")


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


# The one list of options: the module's argument_spec is derived from it (``KeySyncConfig.argument_spec()``) and the
# host's JSON configuration uses the same names. ``host_only`` options are not module options: the
# module takes region and endpoint from amazon.aws's connection options and retries with AWSRetry.
KEYSYNC_OPTIONS = {
    "bucket": {"type": "str", "required": True},
    "prefix": {"type": "str", "default": "keys/"},
    "region": {"type": "str", "host_only": True},
    "endpoint_url": {"type": "str", "host_only": True},
    "mode": {"type": "str", "default": PER_USER, "choices": [PER_USER, SHARED_USER]},
    "shared_user": {"type": "str"},
    "marker_group": {"type": "str", "default": "fleetkeeper-keys"},
    "sudo_group": {"type": "str"},
    "admin_users": {"type": "list", "elements": "str", "default": []},
    "deny_users": {"type": "list", "elements": "str", "default": []},
    "uid_min": {"type": "int", "default": 20000},
    "uid_max": {"type": "int", "default": 59999},
    "uid_overrides": {"type": "dict", "default": {}},
    "system_uid_max": {"type": "int", "default": 999},
    "shell": {"type": "str", "default": "/bin/bash"},
    "home_base": {"type": "path", "default": "/home"},
    "authorized_keys_dir": {"type": "path"},
    "allowed_options": {"type": "list", "elements": "str", "default": []},
    "prepend_options": {"type": "list", "elements": "str", "default": []},
    "max_object_size": {"type": "int", "default": 16384},
    "max_keys_per_user": {"type": "int", "default": 16, "no_log": False},
    # Key objects (PREFIX<name>.pub) a listing may hold; more fails closed, loudly. Other objects do not count.
    "max_keys": {"type": "int", "default": 100000, "no_log": False},
    # shared_user mode: key lines kept in the account's file besides the bucket's (break-glass keys)
    "static_keys": {"type": "list", "elements": "str", "default": [], "no_log": False},
    "removal": {"type": "str", "default": "lock", "choices": list(REMOVAL_ACTIONS)},
    "remove_after_runs": {"type": "int", "default": 1},
    "min_listing_ratio": {"type": "float", "default": 0.5},
    "allow_empty": {"type": "bool", "default": False},
    "state_path": {"type": "path", "default": "/var/lib/fleetkeeper-keysync/state.json"},
    "lock_path": {"type": "path", "default": "/run/fleetkeeper/keysync.lock"},
    "lock_timeout": {"type": "int", "default": 300},
    "root": {"type": "path", "default": "/"},
    "user_backend": {"type": "str", "default": "system", "choices": ["system", "directory"]},
    "download_workers": {"type": "int", "default": 16},
    # A host whose last good sync is older than this (seconds) is stale: loud, and optionally locks users.
    "max_sync_age": {"type": "int", "default": 3600},
    "stale_action": {"type": "str", "default": "none", "choices": list(STALE_ACTIONS)},
    # Which teams of the bucket's team manifest (PREFIX_teams.json) this host admits, and what each grants:
    # {team: {sudo: bool, groups: [group, ...]}}. None: no teams, everyone with a valid key is admitted.
    "teams": {"type": "dict"},
    # botocore's standard-mode attempts per request (the module uses AWSRetry instead)
    "max_attempts": {"type": "int", "default": 5, "host_only": True},
}
KEYSYNC_DEFAULTS = dict((name, spec.get("default")) for name, spec in KEYSYNC_OPTIONS.items())


class KeySyncConfig:
    """Validated options shared by the module and the host-side entry point."""

    OPTIONS = KEYSYNC_OPTIONS
    DEFAULTS = KEYSYNC_DEFAULTS

    @classmethod
    def argument_spec(cls):
        """The module's argument_spec, derived from OPTIONS."""
        spec = {}
        for name, option in cls.OPTIONS.items():
            if option.get("host_only"):
                continue
            entry = dict((k, v) for k, v in option.items() if k != "default" or v is not None)
            if isinstance(entry.get("default"), (list, dict)):
                entry["default"] = type(entry["default"])(entry["default"])
            spec[name] = entry
        return spec

    @classmethod
    def module_option_names(cls):
        return [name for name, option in cls.OPTIONS.items() if not option.get("host_only")]

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            raise ConfigError("unknown keysync option(s): %s" % ", ".join(unknown))
        for name, default in self.DEFAULTS.items():
            value = options.get(name)
            if value is None:
                value = type(default)(default) if isinstance(default, (list, dict)) else default
            setattr(self, name, value)
        self.validate()

    def validate(self):
        """Check every option and normalise it in place (prefix, lists, teams, ...); raise ConfigError at the first
        problem. The checks run in this order."""
        _validate_source_and_choices(self)
        _validate_counts(self)
        self.static_keys = _validate_static_keys(self, _as_list(self.static_keys))
        _validate_listing_ratio(self)
        _validate_key_options(self)
        _validate_names(self)
        _validate_paths_and_backend(self)
        _validate_uid_overrides(self)
        _validate_teams(self)

    @property
    def granted_groups(self):
        """Every group the sync may grant: the marker group, ``sudo_group`` and the teams' groups."""
        groups = {self.marker_group}
        if self.sudo_group:
            groups.add(self.sudo_group)
        for grant in (self.teams or {}).values():
            groups.update(grant["groups"])
        return groups

    @property
    def denied_users(self):
        return set(DEFAULT_DENY_USERS) | set(self.admin_users) | set(self.deny_users)

    def as_dict(self):
        return dict((name, getattr(self, name)) for name in self.DEFAULTS)


# Validation steps of KeySyncConfig.validate(), in the order it runs them; each takes the config and normalises
# what it checks in place.

_COUNT_OPTIONS = ("uid_min", "uid_max", "system_uid_max", "max_object_size", "max_keys_per_user",
                  "remove_after_runs", "lock_timeout", "download_workers", "max_attempts", "max_keys",
                  "max_sync_age")


def _validate_source_and_choices(config):
    """bucket and prefix (normalised to end in '/'), then mode, removal and stale_action."""
    if not config.bucket or not isinstance(config.bucket, str):
        raise ConfigError("bucket is required: the S3 bucket holding <username>.pub objects")
    prefix = config.prefix or ""
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if prefix.startswith("/"):
        raise ConfigError("prefix %r must not start with '/'" % config.prefix)
    config.prefix = prefix
    if config.mode not in (PER_USER, SHARED_USER):
        raise ConfigError("mode must be per_user or shared_user, not %r" % config.mode)
    if config.mode == SHARED_USER and not config.shared_user:
        raise ConfigError("mode shared_user needs shared_user: the existing account whose authorized_keys is managed")
    if config.removal not in REMOVAL_ACTIONS:
        raise ConfigError("removal must be one of %s, not %r" % (", ".join(REMOVAL_ACTIONS), config.removal))
    if config.stale_action not in STALE_ACTIONS:
        raise ConfigError("stale_action must be one of %s, not %r" % (", ".join(STALE_ACTIONS), config.stale_action))


def _validate_counts(config):
    """Integer options: non-negative, the UID range above the system UIDs, and the ones that must be at least 1."""
    for name in _COUNT_OPTIONS:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError("%s must be a non-negative integer, not %r" % (name, value))
    if config.uid_min <= config.system_uid_max or config.uid_max < config.uid_min:
        raise ConfigError("uid range %d-%d must lie above system_uid_max %d"
                          % (config.uid_min, config.uid_max, config.system_uid_max))
    if config.remove_after_runs < 1:
        raise ConfigError("remove_after_runs must be at least 1")
    if config.download_workers < 1 or config.max_attempts < 1 or config.max_keys < 1 or config.max_sync_age < 1:
        raise ConfigError("download_workers, max_attempts, max_keys and max_sync_age must be at least 1")


def _validate_listing_ratio(config):
    try:
        config.min_listing_ratio = float(config.min_listing_ratio)
    except (TypeError, ValueError):
        raise ConfigError("min_listing_ratio must be a number between 0 and 1") from None
    if not 0.0 <= config.min_listing_ratio <= 1.0:
        raise ConfigError("min_listing_ratio must be between 0 and 1, not %r" % config.min_listing_ratio)


def _validate_key_options(config):
    """allowed_options and prepend_options: lower-cased, options sshd knows (prepended ones: flags only)."""
    config.allowed_options = [o.lower() for o in _as_list(config.allowed_options)]
    for option in config.allowed_options:
        if option not in KNOWN_OPTIONS:
            raise ConfigError("allowed_options: unknown authorized_keys option %r (known: %s)"
                              % (option, ", ".join(sorted(KNOWN_OPTIONS))))
    config.prepend_options = [o.lower() for o in _as_list(config.prepend_options)]
    for option in config.prepend_options:
        if option not in KNOWN_OPTIONS or option in VALUE_OPTIONS:
            raise ConfigError("prepend_options: %r is not a flag option sshd knows" % option)


def _validate_names(config):
    """admin_users and deny_users as lists; marker_group, sudo_group and shared_user portable POSIX names."""
    config.admin_users = _as_list(config.admin_users)
    config.deny_users = _as_list(config.deny_users)
    for group in (config.marker_group, config.sudo_group):
        if group is not None and not USERNAME_RE.fullmatch(group):
            raise ConfigError("group name %r is not a portable POSIX name" % group)
    if not config.marker_group:
        raise ConfigError("marker_group is required: it marks the accounts the sync owns")
    if config.shared_user is not None and not USERNAME_RE.fullmatch(config.shared_user):
        raise ConfigError("shared_user %r is not a portable POSIX name" % config.shared_user)


def _validate_paths_and_backend(config):
    """Absolute paths, and user_backend system or directory."""
    for path_option in ("state_path", "lock_path", "home_base", "root"):
        value = getattr(config, path_option)
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError("%s must be an absolute path, not %r" % (path_option, value))
    if config.authorized_keys_dir is not None and not config.authorized_keys_dir.startswith("/"):
        raise ConfigError("authorized_keys_dir must be an absolute path, not %r" % config.authorized_keys_dir)
    if config.user_backend not in ("system", "directory"):
        raise ConfigError("user_backend must be system or directory, not %r" % config.user_backend)


def _validate_static_keys(config, lines):
    if lines and config.mode != SHARED_USER:
        raise ConfigError("static_keys is for mode shared_user (in per_user mode the admin_users keep their own keys)")
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(parse_key_line(str(line).strip(), KNOWN_OPTIONS).line())
        except KeyLineError as exc:
            raise ConfigError("static_keys item %d is not a valid key line: %s" % (number, exc)) from None
    return out


def _validate_uid_overrides(config):
    if not isinstance(config.uid_overrides, dict):
        raise ConfigError("uid_overrides must be a mapping of username to UID, not %r" % (config.uid_overrides,))
    overrides = {}
    owners = {}
    for name, uid in sorted(config.uid_overrides.items(), key=lambda item: str(item[0])):
        if not isinstance(name, str) or not USERNAME_RE.fullmatch(name):
            raise ConfigError("uid_overrides: %r is not a portable POSIX username" % (name,))
        if isinstance(uid, bool):
            uid = None
        try:
            uid = int(uid)
        except (TypeError, ValueError):
            raise ConfigError("uid_overrides: the UID of %s must be an integer, not %r" % (name, uid)) from None
        if uid <= config.system_uid_max or uid > 4294967294:
            raise ConfigError("uid_overrides: UID %d of %s is a system UID (at most system_uid_max %d) or out of range"
                              % (uid, name, config.system_uid_max))
        if uid in owners:
            raise ConfigError("uid_overrides: UID %d is given to both %s and %s" % (uid, owners[uid], name))
        owners[uid] = name
        overrides[name] = uid
    config.uid_overrides = overrides


def _validate_teams(config):
    """``teams`` (per_user mode only) as {team: {"sudo": bool, "groups": sorted groups}}."""
    if config.teams is None:
        return
    if not isinstance(config.teams, dict):
        raise ConfigError("teams must be a mapping of team name to {sudo, groups}, not %r" % (config.teams,))
    if config.mode != PER_USER:
        raise ConfigError("teams needs mode per_user (a shared account has one set of rights for every key)")
    teams = {}
    for team, grant in sorted(config.teams.items(), key=lambda item: str(item[0])):
        teams[team] = _team_grant(config, team, grant)
    config.teams = teams


def _team_grant(config, team, grant):
    """One team's entry of ``teams``, validated: {"sudo": bool, "groups": sorted groups}."""
    if not isinstance(team, str) or not USERNAME_RE.fullmatch(team):
        raise ConfigError("teams: team name %r is not a portable POSIX name (validated like a username)"
                          % (team,))
    grant = {} if grant is None else grant
    if not isinstance(grant, dict):
        raise ConfigError("teams: %s must be a mapping with sudo and groups, not %r" % (team, grant))
    unknown = sorted(set(str(k) for k in grant) - set(TEAM_GRANT_KEYS))
    if unknown:
        raise ConfigError("teams: %s has unknown key(s) %s (known: %s)"
                          % (team, ", ".join(unknown), ", ".join(TEAM_GRANT_KEYS)))
    sudo = grant.get("sudo", False)
    if not isinstance(sudo, bool):
        raise ConfigError("teams: %s: sudo must be true or false, not %r" % (team, sudo))
    groups = _as_list(grant.get("groups"))
    for group in groups:
        if not isinstance(group, str) or not USERNAME_RE.fullmatch(group):
            raise ConfigError("teams: %s: group name %r is not a portable POSIX name" % (team, group))
        if group == config.marker_group:
            raise ConfigError("teams: %s: group %r is the marker group; it is granted to every synced user "
                              "already and must not depend on a team" % (team, group))
    return {"sudo": sudo, "groups": sorted(set(groups))}

# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync, pure part: configuration, parsing, validation and planning.

Nothing here touches the network, the file system or the user database: the
module ``fleetkeeper.aws.s3_authorized_keys`` and the host-side entry point
(``keysync_host``) feed it what they read and apply what it plans, through
``keysync_store`` (files, users, state) and ``keysync_s3`` (listing, downloads).

The layout is ``s3://BUCKET/PREFIX/<username>.pub``, one or more OpenSSH public
key lines per object, and with ``teams`` configured one team manifest beside them,
``s3://BUCKET/PREFIX_teams.json`` ({team: [user, ...]}).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
import zlib

# --------------------------------------------------------------------------
# Errors: one family, turned into fail_json / an exit status at one place.


class KeySyncError(Exception):
    """Base class: the message says what to fix."""


class ConfigError(KeySyncError):
    """The configuration is invalid."""


class ListingError(KeySyncError):
    """The S3 listing failed or was incomplete: nothing is changed."""


class DownloadError(KeySyncError):
    """A key object could not be downloaded whole: nothing is changed."""


class FailClosedError(KeySyncError):
    """The listing looks wrong (empty, far smaller than last time): nothing is changed."""


class LockError(KeySyncError):
    """Another sync holds the lock."""


class UserBackendError(KeySyncError):
    """A user or group operation failed."""


class ApplyError(KeySyncError):
    """Writing a file failed, or a path was unsafe."""


class TeamsError(ListingError):
    """The team manifest is missing, unreadable or invalid while ``teams`` is configured: nothing is changed."""


class UnsafePathError(KeySyncError):
    """The lock or state path is a symlink, or not root's alone: refused before anything is done."""


# --------------------------------------------------------------------------
# Key types and options

KEY_TYPES = {
    # type name: (kind, is_certificate)
    "ssh-ed25519": ("ed25519", False),
    "ssh-rsa": ("rsa", False),
    "ecdsa-sha2-nistp256": ("ecdsa", False),
    "ecdsa-sha2-nistp384": ("ecdsa", False),
    "ecdsa-sha2-nistp521": ("ecdsa", False),
    "sk-ssh-ed25519@openssh.com": ("sk-ed25519", False),
    "sk-ecdsa-sha2-nistp256@openssh.com": ("sk-ecdsa", False),
    "ssh-ed25519-cert-v01@openssh.com": ("ed25519", True),
    "ssh-rsa-cert-v01@openssh.com": ("rsa", True),
    "ecdsa-sha2-nistp256-cert-v01@openssh.com": ("ecdsa", True),
    "ecdsa-sha2-nistp384-cert-v01@openssh.com": ("ecdsa", True),
    "ecdsa-sha2-nistp521-cert-v01@openssh.com": ("ecdsa", True),
    "sk-ssh-ed25519-cert-v01@openssh.com": ("sk-ed25519", True),
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com": ("sk-ecdsa", True),
}

# Known but refused, with the reason.
REFUSED_KEY_TYPES = {
    "ssh-dss": "DSA keys are disabled in OpenSSH since 7.0; use ssh-ed25519",
    "ssh-dss-cert-v01@openssh.com": "DSA keys are disabled in OpenSSH since 7.0; use ssh-ed25519",
}

# Options sshd understands in authorized_keys (lower-case names).
KNOWN_OPTIONS = frozenset([
    "agent-forwarding", "cert-authority", "command", "environment", "expiry-time", "from",
    "no-agent-forwarding", "no-port-forwarding", "no-pty", "no-user-rc", "no-x11-forwarding",
    "no-touch-required", "permitlisten", "permitopen", "port-forwarding", "principals", "pty",
    "restrict", "user-rc", "verify-required", "x11-forwarding",
])
# Options that take a value (name="value").
VALUE_OPTIONS = frozenset([
    "command", "environment", "expiry-time", "from", "permitlisten", "permitopen", "principals",
])

# sshd separates fields with spaces and tabs only (not other Unicode white space).
_WS = re.compile(r"[ \t]+")
# C0 controls except tab, DEL and C1 controls: never part of a key line.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
MAX_LINE_LENGTH = 8192
MAX_BLOB_BYTES = 4096
MAX_CERT_BLOB_BYTES = 16384
MIN_RSA_BITS = 2048
ECDSA_CURVES = {"ecdsa-sha2-nistp256": "nistp256", "ecdsa-sha2-nistp384": "nistp384",
                "ecdsa-sha2-nistp521": "nistp521"}

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

MARKER_LINE = "# --- fleetkeeper.aws s3_authorized_keys: lines below are managed; edit above this line ---"

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


# --------------------------------------------------------------------------
# Parsing


class PublicKey:
    """One validated key line."""

    __slots__ = ("options", "key_type", "blob", "comment")

    def __init__(self, options, key_type, blob, comment):
        self.options = tuple(options)
        self.key_type = key_type
        self.blob = blob
        self.comment = comment

    @property
    def fingerprint(self):
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")

    def line(self, prepend_options=()):
        options = list(self.options)
        for option in reversed(list(prepend_options)):
            if option not in [o.split("=", 1)[0].lower() for o in options]:
                options.insert(0, option)
        parts = []
        if options:
            parts.append(",".join(options))
        parts.append(self.key_type)
        parts.append(base64.b64encode(self.blob).decode("ascii"))
        if self.comment:
            parts.append(self.comment)
        return " ".join(parts)

    def __eq__(self, other):
        return isinstance(other, PublicKey) and self.line() == other.line()

    def __hash__(self):
        return hash(self.line())

    def __repr__(self):
        return "PublicKey(%s %s)" % (self.key_type, self.fingerprint)


class KeyLineError(ValueError):
    """A key line is refused; the message is the reason."""


def _split_options(line):
    """Split ``options rest`` the way sshd does: commas separate, double quotes protect, backslash escapes a quote."""
    in_quotes = False
    i = 0
    while i < len(line):
        char = line[i]
        if char == "\\" and in_quotes and i + 1 < len(line) and line[i + 1] == '"':
            i += 2
            continue
        if char == '"':
            in_quotes = not in_quotes
        elif char in " \t" and not in_quotes:
            break
        i += 1
    if in_quotes:
        raise KeyLineError("unterminated quote in key options")
    options_text = line[:i]
    rest = line[i:].lstrip(" \t")
    options = []
    current = []
    in_quotes = False
    j = 0
    while j < len(options_text):
        char = options_text[j]
        if char == "\\" and in_quotes and j + 1 < len(options_text) and options_text[j + 1] == '"':
            current.append('\\"')
            j += 2
            continue
        if char == '"':
            in_quotes = not in_quotes
        if char == "," and not in_quotes:
            options.append("".join(current))
            current = []
        else:
            current.append(char)
        j += 1
    options.append("".join(current))
    return options, rest


def _read_string(blob, offset):
    if offset + 4 > len(blob):
        raise KeyLineError("key data is truncated")
    (length,) = struct.unpack(">I", blob[offset:offset + 4])
    offset += 4
    if length > len(blob) - offset:
        raise KeyLineError("key data is truncated")
    return blob[offset:offset + length], offset + length


def _check_blob(key_type, blob):
    kind, is_cert = KEY_TYPES[key_type]
    limit = MAX_CERT_BLOB_BYTES if is_cert else MAX_BLOB_BYTES
    if len(blob) > limit:
        raise KeyLineError("key data is %d bytes, more than the %d allowed" % (len(blob), limit))
    inner_type, offset = _read_string(blob, 0)
    try:
        inner = inner_type.decode("ascii")
    except UnicodeDecodeError:
        raise KeyLineError("key data does not start with a key type") from None
    if inner != key_type:
        raise KeyLineError("key data says %r but the line says %r" % (inner, key_type))
    if is_cert:
        _nonce, offset = _read_string(blob, offset)
    if kind == "rsa":
        exponent, offset = _read_string(blob, offset)
        modulus, offset = _read_string(blob, offset)
        bits = len(modulus.lstrip(b"\x00")) * 8
        if modulus.lstrip(b"\x00"):
            bits -= 8 - modulus.lstrip(b"\x00")[0].bit_length()
        if not exponent or bits < MIN_RSA_BITS:
            raise KeyLineError("RSA key has %d bits, fewer than the %d required" % (bits, MIN_RSA_BITS))
    elif kind in ("ed25519", "sk-ed25519"):
        point, offset = _read_string(blob, offset)
        if len(point) != 32:
            raise KeyLineError("ed25519 key has %d bytes, not 32" % len(point))
        if kind == "sk-ed25519":
            _application, offset = _read_string(blob, offset)
    elif kind in ("ecdsa", "sk-ecdsa"):
        curve, offset = _read_string(blob, offset)
        expected = ECDSA_CURVES.get(key_type.split("-cert-")[0], "nistp256")
        if curve.decode("ascii", "replace") != expected:
            raise KeyLineError("ECDSA key names curve %r, the type says %r" % (curve.decode("ascii", "replace"), expected))
        point, offset = _read_string(blob, offset)
        if not point or point[0:1] != b"\x04":
            raise KeyLineError("ECDSA key point is not an uncompressed point")
        if kind == "sk-ecdsa":
            _application, offset = _read_string(blob, offset)
    if not is_cert and offset != len(blob):
        raise KeyLineError("key data has %d trailing bytes" % (len(blob) - offset))


def parse_key_line(line, allowed_options=()):
    """Parse and validate one authorized_keys line; raise KeyLineError with the reason."""
    if len(line) > MAX_LINE_LENGTH:
        raise KeyLineError("line is %d characters, more than %d" % (len(line), MAX_LINE_LENGTH))
    if _CONTROL.search(line):
        raise KeyLineError("line contains control characters")
    line = line.strip(" \t")
    first = _WS.split(line, 1)[0] if line else ""
    options = []
    if first in KEY_TYPES or first in REFUSED_KEY_TYPES:
        rest = line
    else:
        options, rest = _split_options(line)
        if not rest:
            raise KeyLineError("no key type found (expected one of %s)" % ", ".join(sorted(KEY_TYPES)))
    fields = _WS.split(rest, 2)
    key_type = fields[0]
    if key_type in REFUSED_KEY_TYPES:
        raise KeyLineError(REFUSED_KEY_TYPES[key_type])
    if key_type not in KEY_TYPES:
        if len(options) == 1 and "=" not in options[0]:
            key_type = options[0]  # 'ssh-foo AAAA': the first word was meant as the type
        raise KeyLineError("unknown key type %r" % key_type[:64])
    if len(fields) < 2:
        raise KeyLineError("key data missing after %s" % key_type)
    try:
        blob = base64.b64decode(fields[1].encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise KeyLineError("key data is not valid base64") from None
    if not blob:
        raise KeyLineError("key data is empty")
    _check_blob(key_type, blob)
    allowed = set(o.lower() for o in allowed_options)
    cleaned = []
    for option in options:
        name = option.split("=", 1)[0].lower()
        if not option or name not in KNOWN_OPTIONS:
            raise KeyLineError("unknown key option %r" % option[:64])
        if name not in allowed:
            raise KeyLineError("key option %r is not allowed (allowed: %s)"
                               % (name, ", ".join(sorted(allowed)) or "none"))
        if name in VALUE_OPTIONS:
            if "=" not in option or not (option.split("=", 1)[1].startswith('"') and option.endswith('"')):
                raise KeyLineError("key option %r needs a double-quoted value" % name)
        elif "=" in option:
            raise KeyLineError("key option %r takes no value" % name)
        cleaned.append(option)
    comment = fields[2].strip(" \t") if len(fields) > 2 else ""
    return PublicKey(cleaned, key_type, blob, comment)


def parse_key_file(text, allowed_options=(), max_keys=16):
    """Parse an object's text: (keys, [(line number, reason)]). Blank lines and comments are skipped."""
    keys = []
    rejected = []
    seen = set()
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        try:
            key = parse_key_line(stripped, allowed_options)
        except KeyLineError as exc:
            rejected.append((number, str(exc)))
            continue
        if key.blob in seen:
            rejected.append((number, "duplicate key %s" % key.fingerprint))
            continue
        if len(keys) >= max_keys:
            rejected.append((number, "more than %d keys in one file" % max_keys))
            continue
        seen.add(key.blob)
        keys.append(key)
    return keys, rejected


def decode_object(data):
    """Key objects are UTF-8 text; a BOM or NUL byte means it is not a key file."""
    if b"\x00" in data:
        raise KeyLineError("object is binary (contains NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyLineError("object is not UTF-8 text") from None
    return text.lstrip("\ufeff")


# --------------------------------------------------------------------------
# Usernames and object names


def validate_username(name, config):
    """Return None when ``name`` may be synced, else the reason it is refused."""
    if not isinstance(name, str) or not USERNAME_RE.fullmatch(name):
        return ("username %r is not a portable POSIX name (lower-case letter or _ first, then letters, digits, "
                "_ or -, at most 32 characters)" % name[:64])
    if name in config.denied_users:
        return "username %r is reserved (root, system, admin or denied accounts are never synced)" % name
    if name in config.granted_groups:
        return "username %r is the name of a group the sync grants; it is never an account" % name
    return None


def username_from_key(key, prefix):
    """``PREFIX<name>.pub`` -> (name, None), or (None, reason) for anything else; (None, None) to ignore silently."""
    if not key.startswith(prefix):
        return None, "outside the prefix"
    rest = key[len(prefix):]
    if not rest:
        return None, None  # the prefix's own folder placeholder
    if rest.endswith("/"):
        # A folder below the prefix (the listing's common prefix, one entry however many objects it holds).
        return None, "nested objects are not read (objects below %s; expected %s<username>.pub)" % (key, prefix)
    if not rest.endswith(".pub"):
        return None, "not a .pub object"
    name = rest[:-4]
    if "/" in name:
        return None, "nested objects are not read (expected %s<username>.pub)" % prefix
    return name, None


def derived_uid(name, uid_min, uid_max):
    """The UID a name gets on every host: CRC-32 of the name within ``uid_min``..``uid_max``.

    There is no probing past UIDs taken on this host: that would give one name different UIDs on hosts with
    different accounts. A collision is refused instead, and ``uid_overrides`` pins another UID.
    """
    span = uid_max - uid_min + 1
    return uid_min + zlib.crc32(name.encode("utf-8")) % span


def wanted_uid(name, config):
    """``uid_overrides[name]`` when pinned, else the name's derived UID."""
    if name in config.uid_overrides:
        return config.uid_overrides[name]
    return derived_uid(name, config.uid_min, config.uid_max)


def _pin_hint(name):
    return "pin a UID for it with uid_overrides (for example uid_overrides: {%s: <free UID>})" % name


def uid_conflicts(names, config):
    """{name: reason} for listed names that would share a UID; decided from the names alone, so every host agrees.

    A name whose UID is pinned keeps it; every other name on that UID is refused until it is pinned too.
    """
    by_uid = {}
    for name in names:
        by_uid.setdefault(wanted_uid(name, config), []).append(name)
    conflicts = {}
    for uid, group in by_uid.items():
        if len(group) < 2:
            continue
        for name in group:
            if name in config.uid_overrides:
                continue  # overrides are unique (validated), so at most one pinned name per UID
            others = ", ".join(sorted(n for n in group if n != name))
            conflicts[name] = ("UID %d derived from the name %r is also the UID of %s; the user is not created on "
                               "any host until you %s" % (uid, name, others, _pin_hint(name)))
    return conflicts


# --------------------------------------------------------------------------
# Teams


def parse_teams_manifest(data, config):
    """The team manifest's bytes -> {team: sorted members}; raise TeamsError when it is not a valid manifest.

    A JSON object {team: [username, ...]}: team names and members are validated like usernames; a team or a
    member that is not is an invalid manifest (nothing is guessed). Whether members have a key object, and
    whether the host admits the team, is decided by the plan.
    """
    where = "s3://%s/%s%s" % (config.bucket, config.prefix, TEAMS_MANIFEST)
    if len(data) > MAX_TEAMS_MANIFEST_BYTES:
        raise TeamsError("%s is %d bytes, more than %d" % (where, len(data), MAX_TEAMS_MANIFEST_BYTES))
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TeamsError("%s is not UTF-8 JSON: %s" % (where, exc)) from None
    if not isinstance(manifest, dict):
        raise TeamsError("%s must hold a JSON object {team: [user, ...]}" % where)
    teams = {}
    for team, members in manifest.items():
        if not USERNAME_RE.fullmatch(team):
            raise TeamsError("%s: team name %r is not a portable POSIX name (validated like a username)"
                             % (where, team[:64]))
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise TeamsError("%s: team %s must be a list of usernames" % (where, team))
        for member in members:
            if not USERNAME_RE.fullmatch(member):
                raise TeamsError("%s: team %s: member %r is not a portable POSIX username" % (where, team, member[:64]))
        teams[team] = sorted(set(members))
    return teams


def team_grants(name, membership, config):
    """(admitted teams, extra groups, sudo) for ``name`` on this host; (None, [], False) without ``teams``.

    Only teams the host's configuration lists count, and only the host's configuration says what a team gets:
    a team that exists only in the bucket grants nothing.
    """
    if config.teams is None:
        return None, [], False
    admitted = sorted(team for team in config.teams if name in membership.get(team, ()))
    groups = set()
    sudo = False
    for team in admitted:
        groups.update(config.teams[team]["groups"])
        sudo = sudo or config.teams[team]["sudo"]
    return admitted, sorted(groups), sudo


# --------------------------------------------------------------------------
# Listing checks (fail closed)


def check_listing_size(valid_count, previous_count, config):
    """Raise FailClosedError when the listing is empty or far smaller than before.

    ``valid_count`` counts only names the plan accepts (an object named like a system account or an existing
    account the sync does not own cannot pad the listing past the ratio).
    """
    if valid_count == 0 and config.allow_empty:
        return
    if valid_count == 0:
        raise FailClosedError(
            "the listing of s3://%s/%s holds no valid key files; refusing to lock or remove every user "
            "(set allow_empty to sync an empty bucket on purpose); nothing was changed" % (config.bucket, config.prefix))
    if previous_count and valid_count < previous_count * config.min_listing_ratio:
        raise FailClosedError(
            "the listing of s3://%s/%s holds %d accepted key files, fewer than %.0f%% of the %d seen last time; "
            "refusing to apply it (lower min_listing_ratio to accept a large removal); nothing was changed"
            % (config.bucket, config.prefix, valid_count, config.min_listing_ratio * 100, previous_count))


# --------------------------------------------------------------------------
# Planning


class UserInfo:
    """What the user backend knows about an account. ``locked``: expired or password-locked."""

    __slots__ = ("name", "uid", "gid", "home", "shell", "groups", "locked")

    def __init__(self, name, uid, gid, home, shell, groups=(), locked=False):
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home
        self.shell = shell
        self.groups = frozenset(groups)
        self.locked = locked

    def as_dict(self):
        return {"name": self.name, "uid": self.uid, "gid": self.gid, "home": self.home, "shell": self.shell,
                "groups": sorted(self.groups), "locked": self.locked}


class Plan:
    """What one run will do, in the order it is applied: every revocation first, then the grants.

    ``revoke`` holds one dict per user whose access is taken away (object gone or without a valid key):
    ``{"user", "uid", "lock": lock the account now, "userdel": remove it after locking, "drop_groups",
    "fresh": not yet revoked and locked by an earlier run}``.
    """

    def __init__(self):
        self.revoke = []
        self.create = []          # [(name, uid)]
        self.unlock = []
        self.add_groups = []      # [(name, [groups])]
        self.remove_groups = []   # [(name, [groups])] grants the configuration no longer makes
        self.pending_removal = {}  # name -> runs missing so far (locked; userdel waits for remove_after_runs)
        self.keys = {}            # name -> [lines]
        self.rejected = []        # [{"object", "user", "line", "reason"}]
        self.missing = {}         # name -> count, carried into the state
        self.admin_locked = []    # locked by someone else: never unlocked by the sync
        self.withheld = []        # existing users whose object could not be downloaded: no keys this run
        self.granted = {}         # name -> groups the sync granted (state)
        self.accepted = 0         # names the plan accepts (min_listing_ratio counts these)
        self.not_admitted = []    # listed names in no team this host admits (``teams`` set): no keys here
        self.sudoers = []         # users the managed sudoers drop-in lists (their admitted teams grant sudo)

    @property
    def user_changes(self):
        return bool(self.create or self.unlock or self.add_groups or self.remove_groups
                    or any(r["lock"] or r["userdel"] or r["drop_groups"] for r in self.revoke))


def _reject_user(plan, config, name, reason):
    plan.rejected.append({"object": config.prefix + name + ".pub", "user": name, "line": None, "reason": reason})


def _granted_before(history, name, info, wanted_groups):
    """Groups the sync granted ``name`` earlier. A state written before grants were recorded: the configured ones."""
    if "granted" not in history:
        return set(info.groups) & set(wanted_groups)
    return set(history["granted"].get(name, ()))


def _new_user_reason(name, uid, users_by_uid, retired, conflicts):
    if name in conflicts:
        return conflicts[name]
    if uid in users_by_uid:
        return ("UID %d (the UID of %r) belongs to account %r on this host; the user is not created here until you %s"
                % (uid, name, users_by_uid[uid], _pin_hint(name)))
    owner = retired.get(str(uid))
    if owner is not None and owner != name:
        return ("UID %d (the UID of %r) belonged to removed user %r whose files may remain on this host; the user is "
                "not created here until you %s" % (uid, name, owner, _pin_hint(name)))
    return None


def plan_per_user(desired, users, config, history=None, rejected=None, withheld=(), listed=(), membership=None):
    """Plan users for ``per_user`` mode.

    ``desired``: {name: [PublicKey]} from objects with at least one valid key. ``users``: {name: UserInfo} for
    every account on the host. ``history``: the previous state (``missing``, ``locks_made``, ``granted``,
    ``retired_uids``). ``withheld``: names whose object could not be downloaded (an existing user gets no keys
    this run, a new one is not created). ``listed``: every accepted name in the listing, for UID collisions.
    ``membership``: the team manifest {team: [user]}; with ``config.teams`` set only members of a team the host
    lists are admitted (a host that lists no team admits nobody), everyone else gets no keys and, when the sync
    manages them, is revoked like a deleted object. Users that cannot be managed are moved to ``plan.rejected``.
    """
    plan = Plan()
    plan.rejected.extend(rejected or [])
    history = history or {}
    locks_made = set(history.get("locks_made", []))
    retired = history.get("retired_uids", {})
    withheld = set(withheld)
    users_by_uid = dict((u.uid, u.name) for u in users.values())
    base_groups = [config.marker_group] + ([config.sudo_group] if config.sudo_group else [])
    membership = membership or {}
    conflicts = uid_conflicts(sorted(set(desired) | withheld | set(listed)), config)
    for name in sorted(set(desired) | withheld):
        admitted, team_groups, sudo = team_grants(name, membership, config)
        if admitted is not None and not admitted:
            plan.not_admitted.append(name)  # no team this host lists: no keys (and revoked below when managed)
            continue
        wanted_groups = base_groups + [g for g in team_groups if g not in base_groups]
        info = users.get(name)
        reason, uid = _refusal(name, info, config, users_by_uid, retired, conflicts)
        if reason:
            _reject_user(plan, config, name, reason)
            continue
        plan.accepted += 1
        if name in withheld:
            if info is not None:
                plan.withheld.append(name)
                plan.keys[name] = []
                plan.granted[name] = sorted(_granted_before(history, name, info, wanted_groups))
            continue
        if info is None:
            users_by_uid[uid] = name
            plan.create.append((name, uid))
            plan.granted[name] = list(wanted_groups)
        else:
            _plan_existing_user(plan, config, name, info, history, wanted_groups, locks_made)
        plan.keys[name] = [k.line(config.prepend_options) for k in desired[name]]
        if sudo and name not in plan.admin_locked:
            plan.sudoers.append(name)
    _plan_revocations(plan, users, config, history, base_groups)
    return plan


def _refusal(name, info, config, users_by_uid, retired, conflicts):
    """(reason the listed ``name`` is not managed here or None, the UID a new account gets or None)."""
    reason = validate_username(name, config)
    uid = None
    if reason is None and info is not None:
        if info.uid <= config.system_uid_max:
            reason = "account %r exists as a system account (UID %d); never synced" % (name, info.uid)
        elif config.marker_group not in info.groups:
            reason = ("account %r already exists and is not in group %r; existing accounts are never taken over"
                      % (name, config.marker_group))
    elif reason is None:
        uid = wanted_uid(name, config)
        reason = _new_user_reason(name, uid, users_by_uid, retired, conflicts)
    return reason, uid


def _plan_existing_user(plan, config, name, info, history, wanted_groups, locks_made):
    """An existing managed account that keeps access: unlock it when the sync locked it, and its group changes."""
    if info.locked:
        if name in locks_made:
            plan.unlock.append(name)
        else:
            plan.admin_locked.append(name)
            _reject_user(plan, config, name, "account %r was locked by someone other than the sync; it stays "
                         "locked (unlock it by hand to let the user in)" % name)
    granted = _granted_before(history, name, info, wanted_groups)
    add = [g for g in wanted_groups if g not in info.groups]
    drop = sorted((granted & info.groups) - set(wanted_groups))
    if add:
        plan.add_groups.append((name, add))
    if drop:
        plan.remove_groups.append((name, drop))
    plan.granted[name] = sorted((granted - set(drop)) | set(add))


def _plan_revocations(plan, users, config, history, wanted_groups):
    """Revoke every managed account the plan gives no keys (``wanted_groups``: the marker and sudo groups)."""
    missing_before = history.get("missing", {})
    never_touched = set(DEFAULT_DENY_USERS) | set(config.admin_users)
    for name in sorted(users):
        info = users[name]
        # Every managed account the plan gives no keys is revoked: object gone, emptied or without a valid key,
        # and a name the configuration now refuses (deny_users, the name of a granted group).
        if name in plan.keys or config.marker_group not in info.groups:
            continue
        if name in never_touched or info.uid <= config.system_uid_max:
            continue  # a marked admin or system account is never touched
        runs = missing_before.get(name, 0) + 1
        plan.missing[name] = runs
        granted = _granted_before(history, name, info, wanted_groups)
        drop = sorted((granted & info.groups) - {config.marker_group})
        userdel = config.removal == "remove" and runs >= config.remove_after_runs
        if config.removal == "remove" and not userdel:
            plan.pending_removal[name] = runs
        plan.revoke.append({"user": name, "uid": info.uid, "userdel": userdel, "drop_groups": drop,
                            "lock": config.removal in ("lock", "remove") and not info.locked,
                            # revoked in an earlier run and locked since: processes are looked for first
                            "fresh": name not in missing_before or not info.locked})
        plan.keys[name] = []
        plan.granted[name] = sorted(granted - set(drop))


def plan_shared_user(desired, config, rejected=None, withheld=()):
    """Plan ``shared_user`` mode: the account's whole key file is the static keys plus every valid bucket key."""
    plan = Plan()
    plan.rejected.extend(rejected or [])
    lines = []
    for name in sorted(set(desired) | set(withheld)):
        reason = validate_username(name, config)
        if reason:
            _reject_user(plan, config, name, reason)
            continue
        plan.accepted += 1
        for key in desired.get(name, ()):
            lines.append(key.line(config.prepend_options))
    plan.keys[config.shared_user] = lines
    return plan


SHARED_HEADER = ("# Managed by fleetkeeper.aws s3_authorized_keys: every line is rewritten at each sync; "
                 "keys added by hand are removed (use static_keys).")


def render_shared(static_lines, managed_lines):
    """The shared account's whole file: the configured static keys, the marker, then the bucket's keys."""
    out = [SHARED_HEADER] + list(static_lines) + [MARKER_LINE] + list(managed_lines)
    return "\n".join(out) + "\n"


def key_lines(text):
    """Every line of an authorized_keys text that sshd would read as a key (not blank, not a comment)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]


def fingerprints(lines):
    """SHA256 fingerprints of the key lines that parse (whatever their options)."""
    out = set()
    for line in lines:
        try:
            out.add(parse_key_line(line, KNOWN_OPTIONS).fingerprint)
        except KeyLineError:
            continue
    return out


SUDOERS_DROPIN = "/etc/sudoers.d/fleetkeeper-keysync"


def render_sudoers(users):
    """The managed sudoers drop-in: one NOPASSWD line per user (synced accounts have no password); "" for none."""
    if not users:
        return ""
    lines = ["# Managed by fleetkeeper.aws keysync: rewritten at each sync from the teams that grant sudo "
             "(bastion_keys_teams); edits are lost."]
    lines.extend("%s ALL=(ALL:ALL) NOPASSWD: ALL" % name for name in sorted(set(users)))
    return "\n".join(lines) + "\n"


def render_user(managed_lines):
    if not managed_lines:
        return ""
    return "\n".join(managed_lines) + "\n"


def key_summary(lines):
    """'fingerprint comment' per line, for diffs and results."""
    out = []
    for line in lines:
        try:
            key = parse_key_line(line, KNOWN_OPTIONS)
        except KeyLineError:
            continue
        out.append("%s %s%s" % (key.key_type, key.fingerprint, (" " + key.comment) if key.comment else ""))
    return out

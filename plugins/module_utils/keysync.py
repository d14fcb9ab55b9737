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
key lines per object.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
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

USERNAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Accounts Debian, RHEL, Amazon Linux and Ubuntu images create, plus cloud-init defaults.
DEFAULT_DENY_USERS = frozenset([
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy",
    "www-data", "backup", "list", "irc", "gnats", "nobody", "nogroup", "sshd", "messagebus",
    "systemd-network", "systemd-resolve", "systemd-timesync", "systemd-coredump", "_apt",
    "polkitd", "adm", "shutdown", "halt", "operator", "ftp", "chrony", "ntp", "postfix", "dbus",
    "admin", "ec2-user", "ubuntu", "debian", "centos", "fedora", "cloud-user", "ssm-user",
    "halt", "wheel", "sudo", "staff", "users",
])

MARKER_LINE = "# --- fleetkeeper.aws s3_authorized_keys: lines below are managed; edit above this line ---"

PER_USER = "per_user"
SHARED_USER = "shared_user"
REMOVAL_ACTIONS = ("lock", "remove", "keep")


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


class KeySyncConfig:
    """Validated options shared by the module and the host-side entry point."""

    # name: default; the module's argument_spec and the host config file use these names.
    DEFAULTS = {
        "bucket": None,
        "prefix": "keys/",
        "region": None,
        "endpoint_url": None,
        "mode": PER_USER,
        "shared_user": None,
        "marker_group": "fleetkeeper-keys",
        "sudo_group": None,
        "admin_users": [],
        "deny_users": [],
        "uid_min": 20000,
        "uid_max": 59999,
        "system_uid_max": 999,
        "shell": "/bin/bash",
        "home_base": "/home",
        "authorized_keys_dir": None,
        "allowed_options": [],
        "prepend_options": [],
        "max_object_size": 16384,
        "max_keys_per_user": 16,
        "removal": "lock",
        "remove_after_runs": 1,
        "min_listing_ratio": 0.5,
        "allow_empty": False,
        "state_path": "/var/lib/fleetkeeper-keysync/state.json",
        "lock_path": "/run/lock/fleetkeeper-keysync.lock",
        "lock_timeout": 300,
        "root": "/",
        "user_backend": "system",
        "download_workers": 8,
        # host-side entry point only: botocore's standard-mode attempts per request
        "max_attempts": 5,
    }

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            raise ConfigError("unknown keysync option(s): %s" % ", ".join(unknown))
        for name, default in self.DEFAULTS.items():
            value = options.get(name)
            if value is None:
                value = list(default) if isinstance(default, list) else default
            setattr(self, name, value)
        self.validate()

    def validate(self):
        if not self.bucket or not isinstance(self.bucket, str):
            raise ConfigError("bucket is required: the S3 bucket holding <username>.pub objects")
        prefix = self.prefix or ""
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if prefix.startswith("/"):
            raise ConfigError("prefix %r must not start with '/'" % self.prefix)
        self.prefix = prefix
        if self.mode not in (PER_USER, SHARED_USER):
            raise ConfigError("mode must be per_user or shared_user, not %r" % self.mode)
        if self.mode == SHARED_USER and not self.shared_user:
            raise ConfigError("mode shared_user needs shared_user: the existing account whose authorized_keys is managed")
        if self.removal not in REMOVAL_ACTIONS:
            raise ConfigError("removal must be one of %s, not %r" % (", ".join(REMOVAL_ACTIONS), self.removal))
        for name in ("uid_min", "uid_max", "system_uid_max", "max_object_size", "max_keys_per_user",
                     "remove_after_runs", "lock_timeout", "download_workers", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError("%s must be a non-negative integer, not %r" % (name, value))
        if self.uid_min <= self.system_uid_max or self.uid_max < self.uid_min:
            raise ConfigError("uid range %d-%d must lie above system_uid_max %d"
                              % (self.uid_min, self.uid_max, self.system_uid_max))
        if self.remove_after_runs < 1:
            raise ConfigError("remove_after_runs must be at least 1")
        if self.download_workers < 1 or self.max_attempts < 1:
            raise ConfigError("download_workers and max_attempts must be at least 1")
        try:
            self.min_listing_ratio = float(self.min_listing_ratio)
        except (TypeError, ValueError):
            raise ConfigError("min_listing_ratio must be a number between 0 and 1") from None
        if not 0.0 <= self.min_listing_ratio <= 1.0:
            raise ConfigError("min_listing_ratio must be between 0 and 1, not %r" % self.min_listing_ratio)
        self.allowed_options = [o.lower() for o in _as_list(self.allowed_options)]
        for option in self.allowed_options:
            if option not in KNOWN_OPTIONS:
                raise ConfigError("allowed_options: unknown authorized_keys option %r (known: %s)"
                                  % (option, ", ".join(sorted(KNOWN_OPTIONS))))
        self.prepend_options = [o.lower() for o in _as_list(self.prepend_options)]
        for option in self.prepend_options:
            if option not in KNOWN_OPTIONS or option in VALUE_OPTIONS:
                raise ConfigError("prepend_options: %r is not a flag option sshd knows" % option)
        self.admin_users = _as_list(self.admin_users)
        self.deny_users = _as_list(self.deny_users)
        for group in (self.marker_group, self.sudo_group):
            if group is not None and not USERNAME_RE.match(group):
                raise ConfigError("group name %r is not a portable POSIX name" % group)
        if not self.marker_group:
            raise ConfigError("marker_group is required: it marks the accounts the sync owns")
        if self.shared_user is not None and not USERNAME_RE.match(self.shared_user):
            raise ConfigError("shared_user %r is not a portable POSIX name" % self.shared_user)
        for path_option in ("state_path", "lock_path", "home_base", "root"):
            value = getattr(self, path_option)
            if not isinstance(value, str) or not value.startswith("/"):
                raise ConfigError("%s must be an absolute path, not %r" % (path_option, value))
        if self.authorized_keys_dir is not None and not self.authorized_keys_dir.startswith("/"):
            raise ConfigError("authorized_keys_dir must be an absolute path, not %r" % self.authorized_keys_dir)
        if self.user_backend not in ("system", "directory"):
            raise ConfigError("user_backend must be system or directory, not %r" % self.user_backend)

    @property
    def denied_users(self):
        return set(DEFAULT_DENY_USERS) | set(self.admin_users) | set(self.deny_users)

    def as_dict(self):
        return dict((name, getattr(self, name)) for name in self.DEFAULTS)


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
    if not USERNAME_RE.match(name):
        return ("username %r is not a portable POSIX name (lower-case letter or _ first, then letters, digits, "
                "_ or -, at most 32 characters)" % name[:64])
    if name in config.denied_users:
        return "username %r is reserved (root, system, admin or denied accounts are never synced)" % name
    return None


def username_from_key(key, prefix):
    """``PREFIX<name>.pub`` -> (name, None), or (None, reason) for anything else; (None, None) to ignore silently."""
    if not key.startswith(prefix):
        return None, "outside the prefix"
    rest = key[len(prefix):]
    if not rest or rest.endswith("/"):
        return None, None  # folder placeholder
    if not rest.endswith(".pub"):
        return None, "not a .pub object"
    name = rest[:-4]
    if "/" in name:
        return None, "nested objects are not read (expected %s<username>.pub)" % prefix
    return name, None


def deterministic_uid(name, uid_min, uid_max, taken=()):
    """A UID derived from the name (CRC-32), stable across hosts; probe upwards past ``taken``."""
    span = uid_max - uid_min + 1
    start = zlib.crc32(name.encode("utf-8")) % span
    taken = set(taken)
    for step in range(span):
        uid = uid_min + (start + step) % span
        if uid not in taken:
            return uid
    raise UserBackendError("no free UID left in %d-%d" % (uid_min, uid_max))


# --------------------------------------------------------------------------
# Listing checks (fail closed)


def check_listing_size(valid_count, previous_count, config):
    """Raise FailClosedError when the listing is empty or far smaller than before."""
    if valid_count == 0 and config.allow_empty:
        return
    if valid_count == 0:
        raise FailClosedError(
            "the listing of s3://%s/%s holds no valid key files; refusing to lock or remove every user "
            "(set allow_empty to sync an empty bucket on purpose)" % (config.bucket, config.prefix))
    if previous_count and valid_count < previous_count * config.min_listing_ratio:
        raise FailClosedError(
            "the listing of s3://%s/%s holds %d key files, fewer than %.0f%% of the %d seen last time; "
            "refusing to apply it (lower min_listing_ratio to accept a large removal)"
            % (config.bucket, config.prefix, valid_count, config.min_listing_ratio * 100, previous_count))


# --------------------------------------------------------------------------
# Planning


class UserInfo:
    """What the user backend knows about an account."""

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
    """What one run will do. Lists hold user names; ``keys`` maps user -> wanted key lines."""

    def __init__(self):
        self.create = []          # [(name, uid)]
        self.unlock = []
        self.add_groups = []      # [(name, [groups])]
        self.lock = []
        self.remove = []
        self.pending_removal = {}  # name -> runs missing so far
        self.keys = {}            # name -> [lines]
        self.rejected = []        # [{"object", "user", "line", "reason"}]
        self.missing = {}         # name -> count, carried into the state

    @property
    def user_changes(self):
        return bool(self.create or self.unlock or self.add_groups or self.lock or self.remove)


def plan_per_user(desired, users, config, missing_before=None, rejected=None):
    """Plan users for ``per_user`` mode.

    ``desired``: {name: [PublicKey]} from valid objects. ``users``: {name: UserInfo} for every account
    on the host. Returns a Plan; users that cannot be managed are moved to ``plan.rejected``.
    """
    plan = Plan()
    plan.rejected.extend(rejected or [])
    missing_before = missing_before or {}
    taken_uids = set(u.uid for u in users.values())
    wanted_groups = [config.marker_group] + ([config.sudo_group] if config.sudo_group else [])
    for name in sorted(desired):
        keys = desired[name]
        reason = validate_username(name, config)
        info = users.get(name)
        if reason is None and info is not None:
            if info.uid <= config.system_uid_max:
                reason = "account %r exists as a system account (UID %d); never synced" % (name, info.uid)
            elif config.marker_group not in info.groups:
                reason = ("account %r already exists and is not in group %r; existing accounts are never taken over"
                          % (name, config.marker_group))
        if reason:
            plan.rejected.append({"object": config.prefix + name + ".pub", "user": name, "line": None, "reason": reason})
            continue
        if info is None:
            uid = deterministic_uid(name, config.uid_min, config.uid_max, taken_uids)
            taken_uids.add(uid)
            plan.create.append((name, uid))
        else:
            if info.locked:
                plan.unlock.append(name)
            missing_groups = [g for g in wanted_groups if g not in info.groups]
            if missing_groups:
                plan.add_groups.append((name, missing_groups))
        plan.keys[name] = [k.line(config.prepend_options) for k in keys]
    for name in sorted(users):
        info = users[name]
        if name in desired or config.marker_group not in info.groups:
            continue
        if name in config.denied_users or info.uid <= config.system_uid_max:
            continue  # a marked admin or system account is never touched
        if config.removal == "keep":
            plan.keys[name] = []
            continue
        runs = missing_before.get(name, 0) + 1
        if runs < config.remove_after_runs:
            plan.pending_removal[name] = runs
            plan.missing[name] = runs
            continue
        if config.removal == "remove":
            plan.remove.append(name)
        else:
            plan.keys[name] = []
            if not info.locked:
                plan.lock.append(name)
            plan.missing[name] = runs
    return plan


def plan_shared_user(desired, config, rejected=None):
    """Plan ``shared_user`` mode: every valid key into one account's file below the marker."""
    plan = Plan()
    plan.rejected.extend(rejected or [])
    lines = []
    for name in sorted(desired):
        reason = validate_username(name, config)
        if reason:
            plan.rejected.append({"object": config.prefix + name + ".pub", "user": name, "line": None, "reason": reason})
            continue
        for key in desired[name]:
            lines.append(key.line(config.prepend_options))
    plan.keys[config.shared_user] = lines
    return plan


def render_shared(existing_text, managed_lines):
    """Keep every line above the marker (the break-glass keys), replace everything below it."""
    kept = []
    for line in (existing_text or "").splitlines():
        if line.strip() == MARKER_LINE:
            break
        kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    out = kept + [MARKER_LINE] + list(managed_lines)
    return "\n".join(out) + "\n"


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

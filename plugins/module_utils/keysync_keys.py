# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync key lines: key types and options, parsing and validation, fingerprints and key summaries.

Pure: an authorized_keys line or a key object's bytes in, PublicKey objects (or the reason they are refused) out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct


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

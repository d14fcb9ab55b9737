# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Key material and a directory-backed key tree for the key sync tests and benchmark."""

from __future__ import annotations

import base64
import json
import os
import struct

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def openssh_line(public_key, comment: str = "") -> str:
    text = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{text} {comment}".rstrip()


def ed25519_line(comment: str = "") -> str:
    return openssh_line(ed25519.Ed25519PrivateKey.generate().public_key(), comment)


def rsa_line(bits: int = 2048, comment: str = "") -> str:
    return openssh_line(rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key(), comment)


def ecdsa_line(comment: str = "") -> str:
    return openssh_line(ec.generate_private_key(ec.SECP256R1()).public_key(), comment)


def blob_line(key_type: str, *fields: bytes, comment: str = "") -> str:
    blob = ssh_string(key_type.encode()) + b"".join(ssh_string(f) for f in fields)
    return f"{key_type} {base64.b64encode(blob).decode()} {comment}".rstrip(" ")


def sk_ed25519_line(comment: str = "") -> str:
    return blob_line("sk-ssh-ed25519@openssh.com", os.urandom(32), b"ssh:", comment=comment)


def ed25519_cert_line(comment: str = "") -> str:
    # type, nonce, public key, then the rest of the certificate (not checked by the parser)
    return blob_line("ssh-ed25519-cert-v01@openssh.com", os.urandom(32), os.urandom(32), b"\x00" * 8, comment=comment)


def directory_users(root) -> dict:
    path = os.path.join(str(root), "etc", "fleetkeeper-users.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def seed_directory_user(root, name: str, uid: int, groups=(), home: str | None = None) -> None:
    """An account that exists before the sync runs (for no-takeover tests), made by the directory backend itself."""
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import (  # pylint: disable=import-outside-toplevel
        DirectoryUserBackend)

    backend = DirectoryUserBackend(str(root))
    for group in groups:
        backend.ensure_group(group)
    backend.create_user(name, uid, list(groups), "/bin/bash", home or f"/home/{name}")
    backend.flush()


def authorized_keys(root, name: str, keys_dir: str | None = None) -> str | None:
    if keys_dir:
        path = os.path.join(str(root), keys_dir.lstrip("/"), name)
    else:
        path = os.path.join(str(root), "home", name, ".ssh", "authorized_keys")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def render_entry_point(repo_root: str, dest: str, python: str) -> str:
    """Render the role's entry-point template as the role would (shebang, managed comment) into ``dest``."""
    import jinja2  # pylint: disable=import-outside-toplevel

    path = os.path.join(repo_root, "roles", "bastion_keys", "templates", "fleetkeeper-keysync.j2")
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    from ansible import constants  # pylint: disable=import-outside-toplevel
    from ansible.plugins.filter.core import comment  # pylint: disable=import-outside-toplevel

    environment = jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    environment.filters["comment"] = comment  # Ansible's own filter, as the role's template task applies it
    text = environment.from_string(source).render(__bastion_keys_python=python,
                                                  ansible_managed=constants.DEFAULT_MANAGED_STR)
    with open(dest, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(dest, 0o755)
    return dest


def host_files(repo_root: str) -> list:
    """The module_utils files the role copies onto hosts (``__bastion_keys_utils``): one list, the role's."""
    import yaml  # pylint: disable=import-outside-toplevel
    with open(os.path.join(repo_root, "roles", "bastion_keys", "vars", "main.yml"), encoding="utf-8") as handle:
        return list(yaml.safe_load(handle)["__bastion_keys_utils"])

# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync safe file I/O: rooted paths, directory descriptors, O_EXCL temp files, unsafe-node checks.

Every file the sync reads or writes on the host goes through here: nothing follows a symlink, a file that is not
a plain, singly linked file of the expected owner is never read, and a new file is written beside its target under
a temp name created with O_EXCL, then renamed over it. The lock and state live in directories only root can write.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import subprocess

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import ApplyError, UnsafePathError


# --------------------------------------------------------------------------
# Safe file access: directory file descriptors, O_NOFOLLOW, temp file beside the target.

def rooted(root, path):
    """``path`` (absolute) below ``root``."""
    if root in ("", "/"):
        return path
    return os.path.join(root, path.lstrip("/"))


O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def open_dir(path, create_mode=None, owner=None):
    """Open a directory without following a symlink in its last component; create it if asked."""
    try:
        fd = os.open(path, O_DIR)
    except OSError as exc:
        if exc.errno == errno.ENOENT and create_mode is not None:
            os.mkdir(path, create_mode)
            fd = os.open(path, O_DIR)
        elif exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ApplyError("%s is a symlink or not a directory; refusing to write through it" % path)
        else:
            raise ApplyError("cannot open %s: %s" % (path, exc.strerror))
    if owner is not None:
        _fix_owner_mode(fd, owner, create_mode)
    return fd


def open_subdir(parent_fd, name, parent_path, create_mode, owner=None):
    path = os.path.join(parent_path, name)
    try:
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            os.mkdir(name, create_mode, dir_fd=parent_fd)
            fd = os.open(name, O_DIR, dir_fd=parent_fd)
        elif exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ApplyError("%s is a symlink or not a directory; refusing to write through it" % path)
        else:
            raise ApplyError("cannot open %s: %s" % (path, exc.strerror))
    _fix_owner_mode(fd, owner, create_mode)
    return fd


def _fix_owner_mode(fd, owner, mode):
    st = os.fstat(fd)
    if owner is not None and os.geteuid() == 0 and (st.st_uid, st.st_gid) != owner:
        os.fchown(fd, owner[0], owner[1])
    if mode is not None and stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)


O_READ = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
          | getattr(os, "O_NOCTTY", 0))


class UnsafeFileError(ApplyError):
    """A file that must not be read: not a plain file, hard-linked, someone else's, or too large."""


def _check_plain_file(st, path, owners, limit):
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFileError("%s is a symlink" % path)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        raise UnsafeFileError("%s is %s" % (path, kind))
    if st.st_nlink > 1:
        raise UnsafeFileError("%s has %d hard links (another name for it exists)" % (path, st.st_nlink))
    if owners is not None and st.st_uid not in owners:
        raise UnsafeFileError("%s is owned by UID %d, not by root or the user" % (path, st.st_uid))
    if limit is not None and st.st_size > limit:
        raise UnsafeFileError("%s is %d bytes, more than the %d a key file may hold" % (path, st.st_size, limit))


def read_in_dir(dir_fd, name, owners=None, limit=None, path=None):
    """(text, uid, gid, mode) of a plain file, or None when missing.

    The entry is checked with lstat before it is opened (so a device is never opened) and again with fstat on
    the descriptor opened with O_NOFOLLOW|O_NONBLOCK (so a FIFO swapped in meanwhile cannot block): a symlink,
    FIFO, socket, device, directory, a file with more than one hard link, one not owned by ``owners`` or larger
    than ``limit`` raises UnsafeFileError and is never read.
    """
    path = path or name
    try:
        _check_plain_file(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), path, owners, limit)
        fd = os.open(name, O_READ, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError("%s is a symlink" % path) from None
        raise ApplyError("cannot read %s: %s" % (path, exc.strerror)) from None
    try:
        st = os.fstat(fd)
        _check_plain_file(st, path, owners, limit)
        chunks = []
        remaining = (limit if limit is not None else st.st_size) + 1
        while remaining > 0:
            chunk = os.read(fd, min(65536, remaining))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if remaining <= 0 and limit is not None:
            raise UnsafeFileError("%s grew past %d bytes while it was read" % (path, limit))
        return b"".join(chunks).decode("utf-8", "replace"), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
    finally:
        os.close(fd)


TEMP_ATTEMPTS = 5


def atomic_write_in_dir(dir_fd, name, text, owner, mode, sync_dir=True, validate=None):
    """Write ``name`` in the directory ``dir_fd`` via a temp file beside it, fsync and rename.

    With ``sync_dir=False`` the caller fsyncs the directory later (once for many files). The temp file's name
    is random and it is created with O_EXCL: nothing a user plants in a directory they can write (their
    ``~/.ssh``) can be written through or can block the write. ``validate(temp name)`` runs on the written
    temp file before the rename; when it raises, the temp file is removed and the target is left as it was.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for attempt in range(TEMP_ATTEMPTS):
        tmp = ".%s.%s.fk" % (name, secrets.token_hex(12))
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            break
        except FileExistsError:
            if attempt == TEMP_ATTEMPTS - 1:
                raise
    try:
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, owner[0], owner[1])
        os.fchmod(fd, mode)
        data = text.encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        if validate is not None:
            validate(tmp)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if sync_dir:
        os.fsync(dir_fd)


def restore_selinux_context(path):
    """Give a freshly renamed file the label policy wants, where SELinux is on."""
    if not os.path.exists("/sys/fs/selinux/enforce"):
        return False
    try:
        import selinux  # pylint: disable=import-outside-toplevel

        if selinux.is_selinux_enabled():
            selinux.restorecon(path)
            return True
    except ImportError:
        pass
    for candidate in ("/usr/sbin/restorecon", "/sbin/restorecon"):
        if os.path.exists(candidate):
            # Shared with the host-side entry point, which has no AnsibleModule (so no run_command).
            subprocess.run([candidate, "-F", path], check=False,  # pylint: disable=ansible-bad-function
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            return True
    return False


# Root-only directories and files for the lock, the state and quarantined jobs.

def open_private_dir(path, create=True):
    """A directory only this user (root) can write: created 0700 when missing, refused when it is a symlink,
    someone else's, or writable by group or others (world-writable /run/lock, a directory planted in /tmp)."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if create and not os.path.isdir(parent):
        os.makedirs(parent, 0o755)
    if create:
        try:
            os.mkdir(path, 0o700)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise UnsafePathError("cannot create %s: %s" % (path, exc.strerror)) from None
    try:
        fd = os.open(path, O_DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError("%s is a symlink or not a directory; refusing to keep the key sync's lock or "
                                  "state there (remove it: the sync creates it root-only)" % path) from None
        if exc.errno == errno.ENOENT and not create:
            return None
        raise UnsafePathError("cannot open %s: %s" % (path, exc.strerror)) from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise UnsafePathError("%s is owned by UID %d with mode %04o; the key sync's lock and state need a directory "
                              "only root can write (remove it, or point lock_path/state_path elsewhere)"
                              % (path, st.st_uid, stat.S_IMODE(st.st_mode)))
    return fd


def _open_private_file(dir_fd, name, path, flags, mode=0o600):
    try:
        fd = os.open(name, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0), mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError("%s is a symlink; refusing to use it (remove it)" % path) from None
        if exc.errno == errno.ENOENT:
            return None
        raise UnsafePathError("cannot open %s: %s" % (path, exc.strerror)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise UnsafePathError("%s is not a plain file owned by root with one link; refusing to use it (remove it)"
                              % path)
    return fd

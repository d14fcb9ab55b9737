# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync key store, state and lock: KeyFileStore, the state and status files, SyncLock.

User backends live in keysync_users, safe file I/O in keysync_files; the names this module had before the split
are re-exported here, so existing imports keep working.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import ApplyError, LockError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_files import (
    O_DIR,
    UnsafeFileError,
    _open_private_file,
    atomic_write_in_dir,
    open_dir,
    open_private_dir,
    open_subdir,
    read_in_dir,
    restore_selinux_context,
    rooted,
)

# The names this module had before the split, from their new homes.
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import ConfigError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import UnsafePathError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import UserBackendError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_render import SUDOERS_DROPIN  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_render import render_sudoers  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import UserInfo  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_files import O_READ  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_files import TEMP_ATTEMPTS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_procs import Reaper  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import ACCOUNT_COMMENT  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import AT_SPOOLS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import CRON_SPOOLS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import DirectoryUserBackend  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import LINGER_DIR  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import MAX_SUDOERS_BYTES  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import NOLOGIN_CANDIDATES  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import QUARANTINE_DIR  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import SUDOERS_MODE  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import SystemUserBackend  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import VISUDO_CANDIDATES  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import expiry_date  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import find_visudo  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import install_sudoers  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import make_backend  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import nologin_shell  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import quarantine_jobs  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import read_sudoers  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_users import subordinate_ranges  # noqa: F401 pylint: disable=unused-import


class KeyFileStore:
    """Where each user's authorized_keys lives, and how it is read and written.

    Existing files and ``~/.ssh`` are distrusted: anything but a plain, singly linked file owned by root or
    the user, no larger than ``size_limit``, is never read: it is replaced (the new file is renamed over it).
    Nothing of an existing file is ever copied into the new one, in either mode.
    """

    def __init__(self, config, size_limit=None):
        self.config = config
        self.root = config.root
        self.size_limit = size_limit
        self._unsynced_dirs = set()
        self.notes = []   # (user, what was found and replaced)

    def flush(self):
        """fsync every directory a file was renamed into (once each, not once per file)."""
        for path in sorted(self._unsynced_dirs):
            try:
                fd = open_dir(path)
            except ApplyError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced_dirs.clear()

    def target(self, info):
        """(directory path, file name, directory owner, directory mode, file owner, file mode)."""
        if self.config.authorized_keys_dir:
            directory = rooted(self.root, self.config.authorized_keys_dir)
            return directory, info.name, (0, 0), 0o755, (0, 0), 0o644
        home = rooted(self.root, info.home)
        return os.path.join(home, ".ssh"), "authorized_keys", (info.uid, info.gid), 0o700, (info.uid, info.gid), 0o600

    def _owners(self, info):
        owners = {0, os.geteuid()}
        if not self.config.authorized_keys_dir:
            owners.add(info.uid)
        return owners

    def _open_ssh_dir(self, home_fd, home, info, create):
        """``~/.ssh`` as a descriptor; None when missing and not created. A non-directory is replaced or refused."""
        path = os.path.join(home, ".ssh")
        try:
            st = os.stat(".ssh", dir_fd=home_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise ApplyError("cannot inspect %s: %s" % (path, exc.strerror)) from None
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            if not create:
                raise UnsafeFileError("%s is %s; refusing to read or write through it" % (path, what))
            os.unlink(".ssh", dir_fd=home_fd)  # removes the entry (a symlink's target is untouched)
            self.notes.append((info.name, "%s was %s; replaced by a directory" % (path, what)))
            st = None
        if st is None and not create:
            return None
        try:
            return open_subdir(home_fd, ".ssh", home, 0o700, (info.uid, info.gid)) if create else os.open(
                ".ssh", O_DIR, dir_fd=home_fd)
        except OSError as exc:
            raise ApplyError("cannot open %s: %s" % (path, exc.strerror)) from None

    def _open_target_dir(self, info, create):
        directory = self.target(info)[0]
        if self.config.authorized_keys_dir:
            if not os.path.isdir(directory):
                if not create:
                    return None
                os.makedirs(directory, 0o755, exist_ok=True)  # writers run in parallel
            return open_dir(directory, create_mode=None)
        home = rooted(self.root, info.home)
        try:
            home_fd = open_dir(home)
        except ApplyError:
            if not create or os.path.lexists(home):
                raise
            return None
        try:
            return self._open_ssh_dir(home_fd, home, info, create)
        finally:
            os.close(home_fd)

    def _read_fd(self, fd, info):
        directory, name = self.target(info)[:2]
        return read_in_dir(fd, name, self._owners(info), self.size_limit, os.path.join(directory, name))

    def read(self, info):
        """Current text, or None when there is no file yet or it must not be read (see ``check``)."""
        try:
            fd = self._open_target_dir(info, create=False)
        except ApplyError:
            return None
        if fd is None:
            return None
        try:
            found = self._read_fd(fd, info)
        except ApplyError:
            return None
        finally:
            os.close(fd)
        return None if found is None else found[0]

    def write(self, info, text):
        """Write when content, owner or mode differ; True when something changed."""
        directory, name, _dir_owner, _dir_mode, owner, mode = self.target(info)
        fd = self._open_target_dir(info, create=True)
        try:
            try:
                found = self._read_fd(fd, info)
            except UnsafeFileError as exc:
                self.notes.append((info.name, "%s; replaced without reading it" % exc))
                found = None
            if found is not None:
                current, uid, gid, current_mode = found
                same_owner = os.geteuid() != 0 or (uid, gid) == owner
                if current == text and same_owner and current_mode == mode:
                    return False
            try:
                atomic_write_in_dir(fd, name, text, owner, mode, sync_dir=False)
            except OSError as exc:
                raise ApplyError("cannot write %s: %s" % (os.path.join(directory, name), exc.strerror)) from None
            self._unsynced_dirs.add(directory)
        finally:
            os.close(fd)
        restore_selinux_context(os.path.join(directory, name))
        return True

    def revoke(self, info):
        """Take every key away: delete a root-owned key file, empty ``~/.ssh/authorized_keys``. True when changed."""
        if self.config.authorized_keys_dir:
            directory, name = self.target(info)[:2]
            try:
                fd = open_dir(directory)
            except ApplyError:
                return False  # no key directory: no key file
            try:
                os.unlink(name, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return False
                raise ApplyError("cannot remove %s: %s" % (os.path.join(directory, name), exc.strerror)) from None
            finally:
                os.close(fd)
            return True
        try:
            return self.write(info, "")
        except ApplyError:
            if not os.path.lexists(rooted(self.root, info.home)):
                return False  # no home: no key file
            raise

    def delete(self, info):
        return self.revoke(info) if self.config.authorized_keys_dir else False

    def clear(self, info):
        """Remove the key file without reading or rewriting it: what is left when it cannot be written.

        True when a file was removed. A directory in its place holds no keys for sshd and is left alone.
        Raises ApplyError when the file stays.
        """
        directory, name = self.target(info)[:2]
        path = os.path.join(directory, name)
        try:
            fd = self._open_target_dir(info, create=False)
        except ApplyError:
            if not os.path.lexists(directory):
                return False
            raise
        if fd is None:
            return False
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return False
            os.unlink(name, dir_fd=fd)
            return True
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise ApplyError("cannot remove %s: %s" % (path, exc.strerror)) from None
        finally:
            os.close(fd)


# --------------------------------------------------------------------------
# State file and lock


STATE_VERSION = 2


def _load_json(path):
    """A JSON object from a root-only file; None when there is none (or it is unreadable JSON). Unsafe paths raise."""
    fd = open_private_dir(os.path.dirname(path), create=False)
    if fd is None:
        return None
    try:
        file_fd = _open_private_file(fd, os.path.basename(path), path, os.O_RDONLY)
    finally:
        os.close(fd)
    if file_fd is None:
        return None
    with os.fdopen(file_fd, "rb") as handle:
        data = handle.read(64 * 1024 * 1024)
    try:
        found = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def load_state(path):
    """The previous run's state; {} when there is none (or it is unreadable JSON). Unsafe paths raise."""
    state = _load_json(path)
    if state is None or state.get("version") not in (1, STATE_VERSION):
        return {}
    if state.get("version") == 1:
        # Before version 2 the sync recorded no locks or grants: the users it had locked are the missing ones.
        state["locks_made"] = sorted(state.get("missing", {}))
    locks = state.get("locks_made", {})
    if isinstance(locks, list):
        # Locks recorded without what the account had before: unlocking restores no expiry and the configured shell.
        state["locks_made"] = dict((name, None) for name in locks)
    return state


def save_state(path, state):
    fd = open_private_dir(os.path.dirname(path))
    try:
        atomic_write_in_dir(fd, os.path.basename(path), json.dumps(state, sort_keys=True), (0, 0), 0o600)
    finally:
        os.close(fd)


# Each run's outcome and the time of the last good sync, beside the state (read by monitoring and check mode).
STATUS_FILE = "status.json"


def load_status(path):
    return _load_json(path) or {}


def save_status(path, status):
    save_state(path, status)


class SyncLock:
    """An exclusive flock in a root-only directory; waits up to ``timeout`` seconds, then raises LockError.

    The directory is created 0700 when missing; a lock path that is a symlink, or a directory or file that is
    not root's alone, raises UnsafePathError before anything is done.
    """

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        self.fd = None

    def __enter__(self):
        dir_fd = open_private_dir(os.path.dirname(self.path))
        try:
            self.fd = _open_private_file(dir_fd, os.path.basename(self.path), self.path, os.O_RDWR | os.O_CREAT)
        finally:
            os.close(dir_fd)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except (IOError, OSError) as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise LockError("another key sync holds %s (waited %ds)" % (self.path, self.timeout)) from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

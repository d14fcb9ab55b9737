# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync errors: the KeySyncError family, each turned into fail_json or an exit status at one place."""

from __future__ import annotations


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

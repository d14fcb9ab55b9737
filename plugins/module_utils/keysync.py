# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync, pure part: re-exports errors, configuration, key parsing, planning and rendering.

Nothing here touches the network, the file system or the user database: the
module ``fleetkeeper.aws.s3_authorized_keys`` and the host-side entry point
(``keysync_host``) feed it what they read and apply what it plans, through
``keysync_store`` (files, users, state), ``keysync_s3`` (the run) and ``keysync_bucket`` (listing, downloads).

The layout is ``s3://BUCKET/PREFIX/<username>.pub``, one or more OpenSSH public
key lines per object, and with ``teams`` configured one team manifest beside them,
``s3://BUCKET/PREFIX_teams.json`` ({team: [user, ...]}).

The code lives in keysync_errors (exceptions), keysync_keys (key lines, fingerprints, summaries),
keysync_config (option table, KeySyncConfig, validation), keysync_plan (usernames, UIDs, teams, Plan) and
keysync_render (file texts); every name this module had is imported here, so existing imports keep working.
"""

from __future__ import annotations

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import ApplyError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import ConfigError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import DownloadError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import FailClosedError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import KeySyncError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import ListingError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import LockError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import TeamsError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import UnsafePathError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import UserBackendError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import ECDSA_CURVES  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import KEY_TYPES  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import KNOWN_OPTIONS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import KeyLineError  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import MAX_BLOB_BYTES  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import MAX_CERT_BLOB_BYTES  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import MAX_LINE_LENGTH  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import MIN_RSA_BITS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import PublicKey  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import REFUSED_KEY_TYPES  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import VALUE_OPTIONS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import decode_object  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import fingerprints  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import key_lines  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import key_summary  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import parse_key_file  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_keys import parse_key_line  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import DEFAULT_DENY_USERS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import KEYSYNC_DEFAULTS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import KEYSYNC_OPTIONS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import KeySyncConfig  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import MAX_TEAMS_MANIFEST_BYTES  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import PER_USER  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import REMOVAL_ACTIONS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import SHARED_USER  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import STALE_ACTIONS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import TEAMS_MANIFEST  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import TEAM_GRANT_KEYS  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import USERNAME_RE  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_render import MARKER_LINE  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_render import SHARED_HEADER  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_render import SUDOERS_DROPIN  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_render import render_shared  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_render import render_sudoers  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_render import render_user  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import Plan  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import UserInfo  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import check_listing_size  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import derived_uid  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import parse_teams_manifest  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import plan_per_user  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import plan_shared_user  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import team_grants  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import uid_conflicts  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import username_from_key  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import validate_username  # noqa: F401 pylint: disable=unused-import
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_plan import wanted_uid  # noqa: F401 pylint: disable=unused-import

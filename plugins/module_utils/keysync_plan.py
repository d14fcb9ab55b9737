# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Bastion key sync planning: usernames and UIDs, teams, listing checks, UserInfo, Plan, plan_per_user and plan_shared_user.

Pure: what the listing, the user backend and the previous state say in, what one run will do out.
"""

from __future__ import annotations

import json
import zlib

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_config import DEFAULT_DENY_USERS, MAX_TEAMS_MANIFEST_BYTES, TEAMS_MANIFEST, USERNAME_RE
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_errors import FailClosedError, TeamsError


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

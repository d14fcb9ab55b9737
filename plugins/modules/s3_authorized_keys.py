#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: s3_authorized_keys
version_added: 0.1.0
short_description: Sync SSH public keys from an S3 bucket to local users
description:
  - Lists C(s3://BUCKET/PREFIX/) and maps every C(<username>.pub) object to a local user with the keys it holds.
  - In O(mode=per_user) each key file becomes its own Linux account, member of O(marker_group) (and of
    O(sudo_group) when set), with a UID derived from the username within O(uid_min)-O(uid_max) so it is the same
    on every host. Users whose key file disappears are locked or removed (O(removal)); only members of
    O(marker_group) are ever locked or removed, and existing accounts are never taken over.
  - With O(teams), a team manifest beside the keys says who is in which team and the host admits only the teams
    it lists, with the extra groups and sudo (a managed sudoers drop-in checked with C(visudo -cf)) it gives
    each; leaving the last admitted team revokes like a deleted object.
  - In O(mode=shared_user) the sync owns the whole authorized_keys of O(shared_user) - the O(static_keys), a marker
    line, then every valid key from the bucket. A key added to the file by hand is removed at the next run, and
    the sessions it opened are ended.
  - Every way the configuration says "no access" revokes like a deleted object - an object gone, emptied or
    without a valid key, and a name added to O(deny_users). A revoked user's keys go, their whole cgroup
    (C(user-UID.slice)) is frozen and killed, and C(kill(-1)) as their UID is repeated until it finds nothing,
    so a process that forks as it is killed or runs outside the slice (cron, at) does not survive. A key removed
    from an object ends the sessions it opened (in O(mode=per_user) every session of that user).
  - Usernames and key lines are validated. Key options such as C(command=) or C(from=) are refused unless named in
    O(allowed_options). Refused lines are reported in RV(rejected); a user is left with exactly the valid keys of
    their current object, and an object without a valid key revokes the user like a deleted object.
  - Fails closed. A listing that errors, loops or is cut short, or that is empty or smaller than
    O(min_listing_ratio) of the last one, changes nothing and fails with the cause.
  - Revocations come first. Every lock and removal is applied before any creation or update, each user on its
    own; a failing C(useradd), C(usermod), C(userdel) or download affects only its user, every other change is
    applied, and the module then fails naming each failed user (RV(failures)).
  - Change detection uses the ETag and Size of each object from the listing, kept in O(state_path); an unchanged
    bucket costs one ListObjectsV2 request per 1,000 keys and no downloads.
  - The same code runs on the host from the C(fleetkeeper.aws.bastion_keys) role's timer.
author:
  - fleetkeeper maintainers (@fleetkeeper)
options:
  bucket:
    description: S3 bucket holding the key files.
    type: str
    required: true
  prefix:
    description: Key prefix (folder) in O(bucket); a trailing C(/) is added when missing.
    type: str
    default: keys/
  mode:
    description:
      - V(per_user) creates one account per key file; V(shared_user) writes every key into O(shared_user)'s file.
    type: str
    choices: [per_user, shared_user]
    default: per_user
  shared_user:
    description: Existing account whose whole authorized_keys O(mode=shared_user) manages.
    type: str
  static_keys:
    description:
      - With O(mode=shared_user), key lines the account's file keeps besides the bucket's keys (break-glass keys).
        Any other line in the file is removed at the next run.
    type: list
    elements: str
    default: []
  marker_group:
    description: Group that marks the accounts this sync owns. Only its members are ever locked or removed.
    type: str
    default: fleetkeeper-keys
  sudo_group:
    description: Extra group for synced users (for example V(sudo)); it must exist.
    type: str
  teams:
    description:
      - "Which teams of the team manifest C(s3://BUCKET/PREFIX_teams.json) (a JSON object C({team: [user, ...]}))
        this host admits, and what each grants, as C({team: {sudo: bool, groups: [group, ...]}})."
      - Unset (the default), the manifest is not read and every user with a valid key is admitted.
      - Set (even to V({})), a user is admitted only when a member of at least one team listed here; a host that
        lists no team admits nobody (with O(allow_empty) to accept that). A user who leaves the last admitted team,
        or whose team is dropped from this list, is revoked like a deleted object.
      - Each team's value takes two keys, C(sudo) (bool, default false) and C(groups) (list of group names, never
        O(marker_group)); any other key fails. A user gets the union of their admitted teams' C(groups) (created
        when missing, taken away when no longer granted) and, when one of them has C(sudo=true), a line in the
        managed sudoers drop-in C(/etc/sudoers.d/fleetkeeper-keysync) (root 0440, checked with C(visudo -cf)
        before it is installed; when the check fails the drop-in is removed). Only this option grants anything;
        a team in the manifest that is not listed here grants nothing.
      - A missing, unreadable or invalid manifest while this is set changes nothing and fails the run.
      - Needs O(mode=per_user).
    type: dict
  admin_users:
    description: The host's own admin accounts; never synced, locked or removed (the break-glass accounts).
    type: list
    elements: str
    default: []
  deny_users:
    description: More usernames to refuse, on top of root, system accounts and common image users.
    type: list
    elements: str
    default: []
  uid_min:
    description: Lowest UID for synced users.
    type: int
    default: 20000
  uid_max:
    description: Highest UID for synced users.
    type: int
    default: 59999
  uid_overrides:
    description:
      - Pinned UIDs, as username to UID. A user's UID is its pinned UID, else the CRC-32 of the name within
        O(uid_min)-O(uid_max), so it is the same on every host.
      - A new user whose UID another listed name also gets, that an account on the host already has, or that
        belonged to a removed user (recorded in O(state_path)) is not created, with an error naming the UID;
        pin a free UID for it here.
    type: dict
    default: {}
  system_uid_max:
    description: Accounts with a UID up to this are system accounts and never synced or touched.
    type: int
    default: 999
  shell:
    description: Login shell of synced users.
    type: str
    default: /bin/bash
  home_base:
    description: Directory holding the homes of created users.
    type: path
    default: /home
  authorized_keys_dir:
    description:
      - When set, keys are written root-owned to C(DIR/<user>) (for C(AuthorizedKeysFile /etc/ssh/authorized_keys/%u)),
        so users cannot edit their own keys. When unset, to C(~/.ssh/authorized_keys).
    type: path
  allowed_options:
    description: Key options admitted in key files (for example V(no-pty)); any other option refuses the line.
    type: list
    elements: str
    default: []
  prepend_options:
    description: Flag options put in front of every synced key, for example V(restrict), V(port-forwarding).
    type: list
    elements: str
    default: []
  max_object_size:
    description: Objects larger than this many bytes (from the listed Size) are refused without download.
    type: int
    default: 16384
  max_keys_per_user:
    description: At most this many keys per file; further lines are rejected.
    type: int
    default: 16
  removal:
    description:
      - What happens to a marked user whose key file is gone, empty or without a valid key, or whose name the
        configuration now refuses. In every case its keys are removed, the groups the sync granted (other than
        O(marker_group)) are taken away, lingering is disabled, subordinate UID/GID ranges are removed and its
        sessions and processes are ended at once.
      - V(lock) also expires the account and sets a no-login shell (cron, at and the user manager refuse it through
        PAM); unlocking when the key file comes back restores the expiry date and shell it had.
      - V(remove) locks it the same way, then deletes it and its home with C(userdel) (a failing C(userdel) leaves
        the user locked and is retried next run).
      - V(keep) leaves the account and its files as they are, unlocked, but moves its crontab and at jobs into the
        root-only C(/var/lib/fleetkeeper-keysync/jobs/USER) so nothing it left behind runs again.
    type: str
    choices: [lock, remove, keep]
    default: lock
  remove_after_runs:
    description:
      - With O(removal=remove), delete the account only after its key file has been missing for this many runs in
        a row. Access is revoked in the first run whatever this says.
    type: int
    default: 1
  min_listing_ratio:
    description:
      - Refuse a listing holding fewer valid key files than this fraction of the last run's (or of the managed
        users present). V(0) turns the check off.
    type: float
    default: 0.5
  allow_empty:
    description: Accept an empty listing (locks or removes every synced user). Off so an outage cannot do it.
    type: bool
    default: false
  state_path:
    description:
      - State file with the ETag and Size of every object seen, the locks and group grants the sync made and the
        UIDs of removed users; shared with the host-side timer. Its directory must be root's alone, like
        O(lock_path)'s.
    type: path
    default: /var/lib/fleetkeeper-keysync/state.json
  lock_path:
    description:
      - Lock file that keeps two runs from overlapping. Its directory is created root-only (0700); a directory
        that is a symlink, someone else's or writable by others (such as C(/run/lock)), or a lock file that is a
        symlink, is refused and the run fails before doing anything.
    type: path
    default: /run/fleetkeeper/keysync.lock
  lock_timeout:
    description: Seconds to wait for a running sync to finish.
    type: int
    default: 300
  root:
    description:
      - Directory all paths are taken below. Only with O(user_backend=directory).
    type: path
    default: /
  user_backend:
    description:
      - V(system) manages the host's accounts with C(groupadd), C(useradd), C(usermod) and C(userdel).
      - V(directory) keeps accounts in C(ROOT/etc/fleetkeeper-users.json) and writes every file below O(root),
        for rendering a key tree without touching the host's accounts (image staging, tests).
    type: str
    choices: [system, directory]
    default: system
  download_workers:
    description: At most this many downloads of new or changed key files run at once.
    type: int
    default: 16
  max_keys:
    description:
      - At most this many key objects (C(PREFIX<name>.pub)) in the listing. More fails closed - nothing changes, no
        revocation either - and says so. Objects nested below the prefix or with another suffix do not count.
    type: int
    default: 100000
  max_sync_age:
    description:
      - Seconds after the last good sync (one that applied every revocation) when the host counts as stale. A stale
        host's failed run says so at error priority and fails; check mode reports RV(last_success) and RV(age).
    type: int
    default: 3600
  stale_action:
    description:
      - V(lock) locks every synced user (never O(admin_users) or system accounts) once the host is stale and the
        bucket cannot be read; the next good sync unlocks them. V(none) only reports.
    type: str
    choices: [none, lock]
    default: none
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
attributes:
  check_mode:
    support: full
    description: Lists and downloads, then reports what would change without writing anything.
  diff_mode:
    support: full
    description: Shows the keys of every affected user before and after.
  idempotent:
    support: full
    description: A second run with the same bucket changes nothing.
notes:
  - Needs root on the target for O(user_backend=system).
  - The IAM policy the sync needs is in C(docs/iam/keysync.json) of the collection.
seealso:
  - name: Bastion keys guide
    description: How the module, the role and the timer fit together.
    link: https://github.com/fleetkeeper/aws/blob/main/docs/bastion_keys.md
"""

EXAMPLES = r"""
- name: Sync one account per key file, keys root-owned, restricted but usable as a jump host
  fleetkeeper.aws.s3_authorized_keys:
    bucket: example-bastion-keys
    prefix: keys/
    admin_users: [admin]
    authorized_keys_dir: /etc/ssh/authorized_keys
    prepend_options: [restrict, port-forwarding, pty]

- name: The old recipe done safely - every key into ec2-user below the marker
  fleetkeeper.aws.s3_authorized_keys:
    bucket: example-bastion-keys
    mode: shared_user
    shared_user: ec2-user

- name: Preview against a local tree, touching no account
  fleetkeeper.aws.s3_authorized_keys:
    bucket: example-bastion-keys
    user_backend: directory
    root: /srv/keytree
  check_mode: true
  diff: true
"""

RETURN = r"""
users_created:
  description: Users created.
  returned: always
  type: list
  elements: str
  sample: [alice]
users_unlocked:
  description: Locked users whose key file came back.
  returned: always
  type: list
  elements: str
users_groups_added:
  description: Users added to O(marker_group) or O(sudo_group).
  returned: always
  type: list
  elements: dict
users_not_admitted:
  description: Listed users in no team this host admits (O(teams) set); they get no keys here.
  returned: always
  type: list
  elements: str
sudoers_users:
  description: Users the managed sudoers drop-in lists after this run (their admitted teams grant sudo).
  returned: always
  type: list
  elements: str
  sample: [alice]
users_locked:
  description: Users locked because their key file is gone.
  returned: always
  type: list
  elements: str
users_removed:
  description: Users removed because their key file is gone.
  returned: always
  type: list
  elements: str
users_revoked:
  description: Users whose access was taken away this run (object gone or without a valid key).
  returned: always
  type: list
  elements: str
users_sessions_ended:
  description: Revoked users whose sessions and processes were ended.
  returned: always
  type: list
  elements: str
sessions_ended:
  description: In O(mode=shared_user), the sshd sessions ended because the key they authenticated with was removed.
  returned: always
  type: list
  elements: dict
  sample: [{"user": "ec2-user", "pid": 4242}]
last_success:
  description: When the last good sync finished (UTC), from the status file beside O(state_path); null if never.
  returned: always
  type: str
  sample: "2026-12-02T05:00:00Z"
age:
  description: Seconds since the last good sync (since the first recorded run when there was none); null before any run.
  returned: always
  type: int
  sample: 120
stale:
  description: Whether RV(age) is over O(max_sync_age).
  returned: always
  type: bool
max_sync_age:
  description: The O(max_sync_age) the staleness was judged against.
  returned: always
  type: int
users_groups_removed:
  description: Groups the sync had granted and the configuration no longer grants, taken away.
  returned: always
  type: list
  elements: dict
users_locked_by_admin:
  description: Users with a valid key file whose account someone else locked; the sync leaves them locked.
  returned: always
  type: list
  elements: str
failures:
  description: Per-user steps that failed (user, action, message); every other change was applied.
  returned: always
  type: list
  elements: dict
  sample: [{"user": "fleetkeeper-keys", "action": "create", "message": "useradd ... failed (exit 9): group exists"}]
users_pending_removal:
  description: Users whose key file is missing, with the number of runs so far (below O(remove_after_runs)).
  returned: always
  type: dict
keys_added:
  description: Keys added, as user and C(type fingerprint comment).
  returned: always
  type: list
  elements: dict
  sample: [{"user": "alice", "key": "ssh-ed25519 SHA256:3b1f... alice@laptop"}]
keys_removed:
  description: Keys removed, as user and C(type fingerprint comment).
  returned: always
  type: list
  elements: dict
files_written:
  description: Users whose authorized_keys file was written.
  returned: always
  type: list
  elements: str
rejected:
  description: Objects, users and key lines refused, each with the reason; the rest of the sync proceeded.
  returned: always
  type: list
  elements: dict
  sample: [{"object": "keys/root.pub", "user": "root", "line": null, "reason": "username 'root' is reserved"}]
objects:
  description: Objects listed, valid candidates, downloaded and reused from the state file.
  returned: always
  type: dict
  sample: {"listed": 3, "candidates": 2, "downloaded": 0, "reused": 2, "failed": 0}
requests:
  description: S3 requests made (ListObjectsV2 pages and GetObject calls).
  returned: always
  type: dict
  sample: {"list": 1, "get": 0}
timings:
  description: Seconds spent waiting for the listing and for the downloads.
  returned: always
  type: dict
  sample: {"list_s": 0.08, "download_s": 0.0}
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import module_warn
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import KeySyncConfig
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import KeySyncError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_host import failure_lines
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_host import stale_message
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_s3 import sync
from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync_store import make_backend

# A persistent error on one object must not hold the run, and the revocations after it, for minutes:
# amazon.aws's default backoff (10 retries, up to 60 s apart) over botocore's default retries took 270 s.
# botocore's standard mode makes 3 attempts (the listing's paginator has only these), and AWSRetry
# retries each download twice more: at most 9 attempts and about 12 s of sleep for one object.
# A user's aws_config still wins over S3_CONFIG.
S3_CONFIG = {"retries": {"mode": "standard", "max_attempts": 3}}
S3_RETRY = AWSRetry.jittered_backoff(retries=2, delay=1, max_delay=4)


def main():
    module = AnsibleAWSModule(
        argument_spec=KeySyncConfig.argument_spec(),
        required_if=[("mode", "shared_user", ["shared_user"])],
        supports_check_mode=True,
    )
    try:
        config = KeySyncConfig(**dict((name, module.params[name]) for name in KeySyncConfig.module_option_names()))
        s3 = module.client("s3", config=S3_CONFIG, retry_decorator=S3_RETRY)
        result = sync(config, s3, make_backend(config), check_mode=module.check_mode,
                      call_kwargs={"aws_retry": True})
    except KeySyncError as exc:
        stale = getattr(exc, "stale", None)
        if stale:
            module.fail_json(msg="%s; %s" % (exc, stale_message(stale)), error_type=type(exc).__name__, **stale)
        module.fail_json(msg=str(exc), error_type=type(exc).__name__)
    except OSError as exc:
        module.fail_json(msg="key sync failed: %s" % exc, error_type=type(exc).__name__)
    diff = result.pop("diff")
    warn = module_warn(module)
    for item in result["rejected"]:
        where = item["object"] + (":%s" % item["line"] if item["line"] else "")
        warn("%s: %s" % (where, item["reason"]))
    if result.get("stale"):
        warn(stale_message(result))
    if module._diff:  # pylint: disable=protected-access
        result["diff"] = diff
    if result["failures"]:
        module.fail_json(msg="the sync applied every other change, but failed for %d user step(s): %s"
                         % (len(result["failures"]), "; ".join(failure_lines(result))), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

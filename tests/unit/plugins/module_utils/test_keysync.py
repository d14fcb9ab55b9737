# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pure key sync logic: parser, validation, fail-closed rules, planning, rendering."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import (
    KEY_TYPES,
    MARKER_LINE,
    ConfigError,
    FailClosedError,
    KeyLineError,
    KeySyncConfig,
    UserInfo,
    check_listing_size,
    decode_object,
    derived_uid,
    parse_key_file,
    parse_key_line,
    plan_per_user,
    plan_shared_user,
    key_lines,
    render_shared,
    uid_conflicts,
    username_from_key,
    validate_username,
    wanted_uid,
)
from lab.keysync import (
    blob_line,
    ecdsa_line,
    ed25519_cert_line,
    ed25519_line,
    rsa_line,
    sk_ed25519_line,
)

ED = ed25519_line("alice@laptop")
ED_TYPE, ED_B64 = ED.split()[:2]


def config(**overrides):
    options = {"bucket": "keys-bucket", "admin_users": ["admin"]}
    options.update(overrides)
    return KeySyncConfig(**options)


# --- parser ----------------------------------------------------------------

@pytest.mark.parametrize("line", [
    ED, ecdsa_line("e"), rsa_line(2048, "r"), sk_ed25519_line("yubikey"), ed25519_cert_line("cert"),
    "  " + ED + "  ",
], ids=["ed25519", "ecdsa", "rsa", "sk-ed25519", "ed25519-cert", "padded"])
def test_known_key_types_parse(line):
    key = parse_key_line(line)
    assert key.key_type in KEY_TYPES
    assert key.fingerprint.startswith("SHA256:")
    assert parse_key_line(key.line()).line() == key.line()


@pytest.mark.parametrize("line,reason", [
    ("ssh-dss AAAAB3NzaC1kc3M= x", "DSA"),
    ("ssh-foo AAAA x", "unknown key type 'ssh-foo'"),
    ("ssh-ed25519", "key data missing"),
    ("ssh-ed25519 !!!notbase64 x", "not valid base64"),
    (f"ssh-rsa {ED_B64} x", "says 'ssh-ed25519' but the line says 'ssh-rsa'"),
    (blob_line("ssh-ed25519", b"short"), "not 32"),
    (blob_line("ssh-ed25519", b"\x00" * 32, b"extra"), "trailing"),
    (rsa_line(1024), "fewer than the 2048"),
    (f'command="/bin/sh" {ED}', "'command' is not allowed"),
    (f'from="10.0.0.0/8" {ED}', "'from' is not allowed"),
    (f"bogus-option {ED}", "unknown key option"),
    (f'command="unterminated {ED}', "unterminated quote"),
    (ED + "\x00", "control characters"),
    ("ssh-ed25519 " + "A" * 9000, "more than 8192"),
], ids=["dsa", "unknown-type", "no-data", "bad-base64", "type-mismatch", "short-ed25519", "trailing-bytes",
        "rsa-1024", "command", "from", "unknown-option", "unterminated-quote", "nul", "too-long"])
def test_bad_lines_are_refused_with_a_reason(line, reason):
    with pytest.raises(KeyLineError) as info:
        parse_key_line(line)
    assert reason in str(info.value)


def test_allowed_options_pass_and_keep_their_values():
    key = parse_key_line(f'no-pty,from="10.0.0.0/8,192.168.1.1" {ED}', allowed_options=["no-pty", "from"])
    assert key.options == ("no-pty", 'from="10.0.0.0/8,192.168.1.1"')
    assert key.line().startswith('no-pty,from="10.0.0.0/8,192.168.1.1" ssh-ed25519 ')
    with pytest.raises(KeyLineError, match="takes no value"):
        parse_key_line(f'no-pty="x" {ED}', allowed_options=["no-pty"])
    with pytest.raises(KeyLineError, match="double-quoted"):
        parse_key_line(f"from=10.0.0.1 {ED}", allowed_options=["from"])


def test_prepend_options_once():
    key = parse_key_line(ED)
    assert key.line(["restrict", "port-forwarding"]).startswith("restrict,port-forwarding ssh-ed25519 ")
    restricted = parse_key_line("restrict " + ED, allowed_options=["restrict"])
    assert restricted.line(["restrict"]).count("restrict") == 1


def test_key_file_skips_comments_blank_and_duplicates_and_caps_count():
    other = ed25519_line("b")
    text = "\n".join(["# a comment", "", ED, ED, "garbage", other, ed25519_line("c")])
    keys, rejected = parse_key_file(text, max_keys=2)
    assert [k.comment for k in keys] == ["alice@laptop", "b"]
    reasons = dict(rejected)
    assert "duplicate" in reasons[4] and "no key type" in reasons[5] and "more than 2 keys" in reasons[7]


def test_binary_and_non_utf8_objects_are_refused():
    with pytest.raises(KeyLineError, match="binary"):
        decode_object(b"ssh-ed25519 \x00")
    with pytest.raises(KeyLineError, match="UTF-8"):
        decode_object(b"\xff\xfe")
    assert decode_object(("\ufeff" + ED).encode()) == ED


# --- property-based --------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_crashes_on_arbitrary_text(text):
    try:
        key = parse_key_line(text, allowed_options=["from", "command", "no-pty", "restrict"])
    except KeyLineError:
        return
    # Anything accepted is a known type whose blob names that type, and re-parses to itself.
    assert key.key_type in KEY_TYPES
    assert parse_key_line(key.line(), allowed_options=["from", "command", "no-pty", "restrict"]).line() == key.line()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(sorted(KEY_TYPES)))
def test_parser_never_crashes_on_arbitrary_blobs(blob, key_type):
    line = f"{key_type} {base64.b64encode(blob).decode()}"
    try:
        key = parse_key_line(line)
    except KeyLineError:
        return
    assert key.blob == blob


comment_text = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF, blacklist_categories=("Cc", "Cs")),
                       min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32), comment_text)
def test_valid_ed25519_lines_round_trip(point, comment):
    line = blob_line("ssh-ed25519", point, comment=comment)
    key = parse_key_line(line)
    assert key.line() == line
    assert key.comment == comment


option_names = st.sampled_from(["command", "from", "environment", "permitopen", "agent-forwarding", "no-pty",
                                "x11-forwarding", "cert-authority", "restrict"])


@settings(max_examples=200, deadline=None)
@given(st.lists(option_names, min_size=1, max_size=4), st.lists(option_names, max_size=4))
def test_options_outside_the_allow_list_always_refuse_the_line(used, allowed):
    from ansible_collections.fleetkeeper.aws.plugins.module_utils.keysync import VALUE_OPTIONS

    options = ",".join(f'{name}="x,y z"' if name in VALUE_OPTIONS else name for name in used)
    line = f"{options} {ED}"
    if set(used) <= set(allowed):
        assert parse_key_line(line, allowed_options=allowed).options
    else:
        with pytest.raises(KeyLineError, match="not allowed"):
            parse_key_line(line, allowed_options=allowed)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_accepted_usernames_are_safe(name):
    if validate_username(name, config()) is None:
        assert "/" not in name and not name.startswith("-") and not name.startswith(".")
        assert 0 < len(name) <= 32 and name not in ("root", "admin")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([ED, ed25519_line("s")]), max_size=2, unique=True),
       st.lists(st.sampled_from([ED, ed25519_line("x")]), max_size=3))
def test_shared_render_holds_exactly_the_static_and_bucket_keys_and_is_idempotent(static, managed):
    once = render_shared(static, managed)
    above, below = once.split(MARKER_LINE + "\n", maxsplit=1)
    assert key_lines(above) == static and key_lines(below) == managed
    assert render_shared(static, managed) == once


def test_shared_render_drops_every_line_added_by_hand():
    # whatever the file held before (above or below the marker) is not an input: only static and bucket keys
    hand = ed25519_line("hand")
    rendered = render_shared([ED], [])
    assert hand not in rendered and key_lines(rendered) == [ED]


# --- names, uids, listing checks ------------------------------------------

@pytest.mark.parametrize("name", ["root", "admin", "-oProxyCommand", "../x", "Alice", "a" * 33, "", "sshd", "bad$",
                                  "alice\n", "alice\r", "alice\t", "ali\x00ce", "alice\x7f", "alice\u0085",
                                  "fleetkeeper-keys", "sudo"])
def test_refused_usernames(name):
    assert validate_username(name, config(sudo_group="sudo")) is not None


PORTABLE = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=34), st.sampled_from(["", "\n", "\r\n", "\x00", "\x1b", "\u2028"]))
def test_usernames_are_checked_whole(name, tail):
    """Accepted exactly when every character is portable: a trailing newline or any control character refuses."""
    candidate = name + tail
    accepted = validate_username(candidate, config()) is None
    portable = (all(c in PORTABLE for c in candidate) and candidate[0] not in "-0123456789"
                and len(candidate) <= 32 and candidate not in config().denied_users | {"fleetkeeper-keys"})
    assert accepted == portable
    if tail:
        assert not accepted


@pytest.mark.parametrize("key,expected", [
    ("keys/alice.pub", ("alice", None)),
    ("keys/", (None, None)),
    ("keys/team/alice.pub", (None, "nested objects are not read (expected keys/<username>.pub)")),
    ("keys/team/", (None, "nested objects are not read (objects below keys/team/; expected keys/<username>.pub)")),
    ("keys/README.md", (None, "not a .pub object")),
])
def test_username_from_object_key(key, expected):
    assert username_from_key(key, "keys/") == expected


def test_uids_come_from_the_name_alone_or_from_uid_overrides():
    first = derived_uid("alice", 20000, 59999)
    assert first == derived_uid("alice", 20000, 59999) and 20000 <= first <= 59999
    assert wanted_uid("alice", config(uid_overrides={"alice": 45000})) == 45000
    # two names on one UID: both refused on every host (decided from the names), until one is pinned
    cfg = config(uid_min=20000, uid_max=20000)
    conflicts = uid_conflicts(["alice", "bob"], cfg)
    assert set(conflicts) == {"alice", "bob"} and "uid_overrides" in conflicts["alice"]
    pinned = config(uid_min=20000, uid_max=20000, uid_overrides={"bob": 20000})
    assert set(uid_conflicts(["alice", "bob"], pinned)) == {"alice"}
    with pytest.raises(ConfigError, match="given to both"):
        config(uid_overrides={"alice": 30000, "bob": 30000})
    with pytest.raises(ConfigError, match="system UID"):
        config(uid_overrides={"alice": 10})


def test_a_collision_with_a_local_account_or_a_removed_users_uid_is_refused_not_probed():
    key = parse_key_line(ED)
    cfg = config()
    uid = derived_uid("alice", 20000, 59999)
    other = users(UserInfo("zed", uid, uid, "/home/zed", "/bin/bash", ["zed"]))
    plan = plan_per_user({"alice": [key]}, other, cfg)
    assert not plan.create and "belongs to account 'zed'" in plan.rejected[0]["reason"]
    assert "uid_overrides" in plan.rejected[0]["reason"]
    plan = plan_per_user({"alice": [key]}, {}, cfg, history={"retired_uids": {str(uid): "olduser"}})
    assert not plan.create and "removed user 'olduser'" in plan.rejected[0]["reason"]
    plan = plan_per_user({"alice": [key]}, {}, cfg, history={"retired_uids": {str(uid): "alice"}})
    assert plan.create == [("alice", uid)]  # the same user coming back gets its own UID
    plan = plan_per_user({"alice": [key]}, other, config(uid_overrides={"alice": 41000}))
    assert plan.create == [("alice", 41000)]


def test_empty_and_far_smaller_listings_fail_closed():
    cfg = config()
    with pytest.raises(FailClosedError, match="no valid key files"):
        check_listing_size(0, 10, cfg)
    with pytest.raises(FailClosedError, match="fewer than 50%"):
        check_listing_size(4, 10, cfg)
    check_listing_size(5, 10, cfg)
    check_listing_size(1, 10, config(min_listing_ratio=0))
    check_listing_size(0, 10, config(allow_empty=True))


@pytest.mark.parametrize("overrides,message", [
    ({"bucket": None}, "bucket is required"),
    ({"mode": "shared_user"}, "needs shared_user"),
    ({"uid_min": 500}, "must lie above"),
    ({"allowed_options": ["rm-rf"]}, "unknown authorized_keys option"),
    ({"prepend_options": ["command"]}, "not a flag option"),
    ({"min_listing_ratio": 2}, "between 0 and 1"),
    ({"state_path": "relative"}, "absolute path"),
    ({"nonsense": 1}, "unknown keysync option"),
])
def test_bad_configuration_says_what_to_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(**overrides)


# --- planning --------------------------------------------------------------

def users(*infos):
    return dict((u.name, u) for u in infos)


def test_plan_creates_new_users_and_never_takes_over_or_touches_admins():
    cfg = config(sudo_group="sudo")
    key = parse_key_line(ED)
    existing = users(
        UserInfo("admin", 1000, 1000, "/home/admin", "/bin/bash", ["sudo", "fleetkeeper-keys"]),
        UserInfo("bob", 1001, 1001, "/home/bob", "/bin/bash", ["bob"]),
        UserInfo("daemonish", 500, 500, "/", "/bin/false", ["fleetkeeper-keys"]),
        UserInfo("carol", 30000, 30000, "/home/carol", "/bin/bash", ["fleetkeeper-keys"], locked=True),
        UserInfo("dave", 30001, 30001, "/home/dave", "/bin/bash", ["fleetkeeper-keys"]),
    )
    history = {"locks_made": ["carol"], "granted": {}}
    plan = plan_per_user({"alice": [key], "bob": [key], "carol": [key], "daemonish": [key]}, existing, cfg, history)
    assert [name for name, _keys in plan.create] == ["alice"]
    assert plan.unlock == ["carol"] and plan.add_groups == [("carol", ["sudo"])]
    assert [r["user"] for r in plan.revoke] == ["dave"] and plan.revoke[0]["lock"] and plan.keys["dave"] == []
    reasons = dict((r["user"], r["reason"]) for r in plan.rejected)
    assert "never taken over" in reasons["bob"] and "system account" in reasons["daemonish"]
    assert "admin" not in plan.keys  # marked admin account is left alone
    assert plan.accepted == 2  # alice, carol: bob and daemonish do not count towards min_listing_ratio


def test_an_account_locked_by_someone_else_stays_locked_and_is_reported():
    key = parse_key_line(ED)
    existing = users(UserInfo("carol", 30000, 30000, "/home/carol", "/bin/bash", ["fleetkeeper-keys"], locked=True))
    plan = plan_per_user({"carol": [key]}, existing, config(), {"locks_made": []})
    assert plan.unlock == [] and plan.admin_locked == ["carol"]
    assert "locked by someone other than the sync" in plan.rejected[0]["reason"]


def test_groups_the_sync_granted_follow_the_configuration_and_others_are_left_alone():
    key = parse_key_line(ED)
    existing = users(UserInfo("carol", 30000, 30000, "/home/carol", "/bin/bash",
                              ["fleetkeeper-keys", "sudo", "docker"]))
    history = {"granted": {"carol": ["fleetkeeper-keys", "sudo"]}}
    plan = plan_per_user({"carol": [key]}, existing, config(), history)
    assert plan.remove_groups == [("carol", ["sudo"])] and plan.granted["carol"] == ["fleetkeeper-keys"]
    # docker was never granted by the sync: the configuration granting it later does not make it ours to take
    plan = plan_per_user({"carol": [key]}, existing, config(sudo_group="docker"), history)
    assert plan.remove_groups == [("carol", ["sudo"])] and plan.add_groups == []
    # a revoked user loses every granted group but the marker
    plan = plan_per_user({}, existing, config(sudo_group="sudo"), history)
    assert plan.revoke[0]["drop_groups"] == ["sudo"]


def test_revocation_happens_at_once_and_userdel_waits_for_n_missing_runs():
    cfg = config(removal="remove", remove_after_runs=3)
    existing = users(UserInfo("dave", 30001, 30001, "/home/dave", "/bin/bash", ["fleetkeeper-keys"]))
    plan = plan_per_user({}, existing, cfg, {"missing": {"dave": 1}})
    assert plan.pending_removal == {"dave": 2}
    assert plan.revoke == [{"user": "dave", "uid": 30001, "lock": True, "userdel": False, "drop_groups": [],
                            "fresh": True}]
    plan = plan_per_user({}, existing, cfg, {"missing": {"dave": 2}})
    assert plan.revoke[0]["userdel"]


def test_a_failed_download_creates_nobody_and_gives_an_existing_user_no_keys():
    existing = users(UserInfo("dave", 30001, 30001, "/home/dave", "/bin/bash", ["fleetkeeper-keys"]))
    plan = plan_per_user({}, existing, config(), {}, withheld=["dave", "erin"])
    assert plan.create == [] and plan.revoke == [] and plan.withheld == ["dave"] and plan.keys == {"dave": []}
    assert plan.accepted == 2


def test_shared_mode_collects_every_valid_key():
    cfg = config(mode="shared_user", shared_user="ec2-user", prepend_options=["restrict"])
    plan = plan_shared_user({"alice": [parse_key_line(ED)], "root": [parse_key_line(ED)]}, cfg)
    assert plan.keys["ec2-user"] == ["restrict " + parse_key_line(ED).line()]
    assert plan.rejected[0]["user"] == "root"


def test_the_module_argument_spec_is_derived_from_the_one_option_table():
    spec = KeySyncConfig.argument_spec()
    assert set(spec) == set(KeySyncConfig.OPTIONS) - {"region", "endpoint_url", "max_attempts"}
    assert spec["bucket"] == {"type": "str", "required": True}
    assert spec["lock_path"]["default"] == "/run/fleetkeeper/keysync.lock"
    assert spec["download_workers"]["default"] == 16
    spec["admin_users"]["default"].append("x")
    assert KeySyncConfig.DEFAULTS["admin_users"] == []

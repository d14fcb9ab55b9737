# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Roll an IAM instance profile onto Auto Scaling groups: the planning half (no API calls).

The module ``fleetkeeper.aws.asg_instance_profile`` is a thin door onto three files:

* this one, pure planning: :func:`plan_template` decides whether a launch
  template needs a new version and what the group must point at;
  :func:`plan_instance` decides, from an instance's association records, whether
  it is associated, replaced, disassociated, left alone as a mismatch, or fine.
  Both take plain dictionaries as botocore returns them, so unit tests feed
  them directly. The errors of both halves are here too.
* ``instance_profile_roll.py``, the rolling half: :class:`Options` and
  :class:`Roller`, which orchestrates the plans and their API calls;
* ``autoscaling_gateway.py``, which makes the API calls.

Errors are raised as :class:`InstanceProfileError` subclasses; the module turns
them into ``fail_json``/``fail_json_aws`` in one place.
"""

from __future__ import annotations

import copy
import re

from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_code
from ansible_collections.fleetkeeper.aws.plugins.module_utils.aws_calls import error_message

# Association states (DescribeIamInstanceProfileAssociations).
ASSOCIATING = "associating"
ASSOCIATED = "associated"
DISASSOCIATING = "disassociating"
DISASSOCIATED = "disassociated"
LIVE_STATES = (ASSOCIATING, ASSOCIATED)

IN_SERVICE = "InService"

# Instance actions.
ACTION_NONE = "none"
ACTION_ASSOCIATE = "associate"
ACTION_REPLACE = "replace"
ACTION_DISASSOCIATE = "disassociate"
ACTION_MISMATCH = "mismatch"
CHANGING_ACTIONS = (ACTION_ASSOCIATE, ACTION_REPLACE, ACTION_DISASSOCIATE)

# What the group's launch template version should be after the run.
VERSION_KEEP = "keep"
VERSION_LATEST = "latest"
VERSION_DEFAULT = "default"
VERSION_PINNED = "pinned"
VERSION_CHOICES = (VERSION_KEEP, VERSION_LATEST, VERSION_DEFAULT, VERSION_PINNED)

LATEST = "$Latest"
DEFAULT = "$Default"

ASSOCIATION_BATCH_SIZE = 100  # instance ids per DescribeIamInstanceProfileAssociations filter
ASSOCIATION_PAGE_SIZE = 1000  # MaxResults maximum

# Error codes and messages.
IAM_NOT_READY_MESSAGE = re.compile(r"invalid iam instance profile", re.IGNORECASE)
PROFILE_NOT_FOUND_CODES = ("NoSuchEntity", "NoSuchEntityException")
INCORRECT_STATE = "IncorrectState"
ASSOCIATION_NOT_FOUND = "InvalidAssociationID.NotFound"
TEMPLATE_NOT_FOUND_CODES = (
    "InvalidLaunchTemplateId.NotFound",
    "InvalidLaunchTemplateName.NotFoundException",
    "InvalidLaunchTemplateId.Malformed",
    "InvalidLaunchTemplateId.VersionNotFound",
    "InvalidLaunchTemplateName.MalformedException",
)


class InstanceProfileError(Exception):
    """Base of every error this module raises; the message says what to fix."""


# The roller's errors are shared by every setting it rolls (instance profile, metadata options).
RollError = InstanceProfileError


class InputError(InstanceProfileError):
    """The task's input names something that does not exist or cannot be used."""


class ProfileNotFoundError(InputError):
    def __init__(self, name):
        super().__init__(
            f"instance profile {name!r} does not exist: create it first (amazon.aws.iam_instance_profile "
            f"or the fleetkeeper.aws.instance_profile role) or fix the name"
        )
        self.name = name


class GroupError(InstanceProfileError):
    """A problem with one Auto Scaling group; other groups are not affected."""


class AwsCallError(InstanceProfileError):
    """An AWS call failed; ``original`` is botocore's exception (for fail_json_aws), ``action`` the call."""

    def __init__(self, action, exc):
        code = error_code(exc)
        detail = error_message(exc) or str(exc)
        super().__init__(f"{action} failed: {code + ': ' if code else ''}{detail}")
        self.action = action
        self.code = code
        self.original = exc


class PlanningError(InputError):
    """Bad input found while planning: nothing was changed. ``groups`` holds the per-group results."""

    def __init__(self, message, groups):
        super().__init__(message)
        self.groups = groups


def is_iam_not_ready(exc):
    """True for EC2's answer to a profile IAM has not yet propagated to EC2."""
    code = error_code(exc)
    if code in PROFILE_NOT_FOUND_CODES:
        return True
    return code.startswith("InvalidParameter") and bool(IAM_NOT_READY_MESSAGE.search(error_message(exc)))


# --------------------------------------------------------------------------
# Instance profile identity
# --------------------------------------------------------------------------


def profile_name_from_arn(arn):
    """``arn:aws:iam::123:instance-profile/path/name`` -> ``name``."""
    if not arn:
        return None
    resource = arn.split(":", 5)[-1]
    return resource.rsplit("/", 1)[-1]


def is_profile_arn(value):
    return bool(value) and value.startswith("arn:") and ":instance-profile/" in value


class ProfileRef:
    """The desired instance profile. ``arn`` is None only in check mode before the profile exists."""

    def __init__(self, name, arn=None):
        self.name = name
        self.arn = arn

    def matches(self, spec):
        """True if ``spec`` (an ARN, or a launch template's {Arn, Name}) names this profile.

        Profile names are unique in an account whatever their path, so a
        template naming the profile by name resolves to the same ARN; an ARN is
        compared whole (an ARN with another path is another profile).
        """
        if not spec:
            return False
        if isinstance(spec, str):
            arn, name = spec, None
        else:
            arn, name = spec.get("Arn"), spec.get("Name")
        if arn:
            if self.arn:
                return arn == self.arn
            return profile_name_from_arn(arn) == self.name
        return name == self.name

    def as_template_data(self):
        return {"Arn": self.arn} if self.arn else {"Name": self.name}

    def display(self):
        return self.arn or f"(instance profile {self.name}, not created yet)"

    def to_dict(self):
        return {"name": self.name, "arn": self.arn}


def profile_display(spec):
    """An ARN, or the name a template uses, for reports."""
    if not spec:
        return None
    if isinstance(spec, str):
        return spec
    return spec.get("Arn") or spec.get("Name")


# --------------------------------------------------------------------------
# Launch templates: pure planning
# --------------------------------------------------------------------------


def follows(spec):
    """What a group's launch template version spec follows: $Latest, $Default or pinned."""
    if spec in (None, "", DEFAULT):
        return DEFAULT
    if spec == LATEST:
        return LATEST
    return "pinned"


def template_references(group):
    """The launch template references of one group, as a list of dicts.

    Each has ``source`` (where in the group it sits), ``id``, ``name`` and
    ``version`` (the spec as the group holds it, None meaning $Default).
    Raises GroupError for groups on a launch configuration.
    """
    name = group["AutoScalingGroupName"]
    if group.get("LaunchConfigurationName"):
        raise GroupError(
            f"Auto Scaling group {name!r} uses launch configuration {group['LaunchConfigurationName']!r}: "
            "launch configurations are unsupported (they cannot carry a new instance profile without replacing "
            "the configuration). Migrate the group to a launch template, then run again."
        )
    refs = []
    if group.get("LaunchTemplate"):
        spec = group["LaunchTemplate"]
        refs.append(_ref("LaunchTemplate", spec))
    policy = group.get("MixedInstancesPolicy")
    if policy:
        template = policy.get("LaunchTemplate") or {}
        spec = template.get("LaunchTemplateSpecification")
        if spec:
            refs.append(_ref("MixedInstancesPolicy", spec))
        for index, override in enumerate(template.get("Overrides") or []):
            spec = override.get("LaunchTemplateSpecification")
            if spec:
                refs.append(_ref(f"MixedInstancesPolicy.Overrides[{index}]", spec))
    if not refs:
        raise GroupError(f"Auto Scaling group {name!r} has neither a launch template nor a mixed instances policy")
    return refs


def _ref(source, spec):
    return {
        "source": source,
        "id": spec.get("LaunchTemplateId"),
        "name": spec.get("LaunchTemplateName"),
        "version": spec.get("Version"),
    }


class TemplateState:
    """What is known of one launch template: latest and default version numbers and version data.

    Planning reads it; applying (or simulating, in check mode) a new version
    updates it, so the next group sharing the template is planned against it.
    """

    def __init__(self, template_id, name, latest, default, versions):
        self.id = template_id
        self.name = name
        self.latest = latest
        self.default = default
        self.versions = dict(versions)  # number -> LaunchTemplateData

    @classmethod
    def from_versions(cls, records):
        """Build from DescribeLaunchTemplateVersions records that include $Latest and $Default."""
        if not records:
            raise ValueError("no launch template versions")
        versions = {}
        default = None
        for record in records:
            versions[int(record["VersionNumber"])] = record.get("LaunchTemplateData") or {}
            if record.get("DefaultVersion"):
                default = int(record["VersionNumber"])
        first = records[0]
        return cls(first["LaunchTemplateId"], first.get("LaunchTemplateName"), max(versions), default, versions)

    def resolve(self, spec):
        if spec in (None, "", DEFAULT):
            return self.default
        if spec == LATEST:
            return self.latest
        return int(spec)

    def record_version(self, number, data, make_default=False):
        self.versions[number] = data
        self.latest = max(self.latest, number)
        if make_default:
            self.default = number


def public_template_plan(plan):
    """A template plan as returned to the user (without the request bodies)."""
    out = {k: v for k, v in plan.items() if k != "create_version"}
    out.setdefault("created_version", None)
    return out


def patched_data(data, desired, state):
    """The full launch template data the new version will carry."""
    result = copy.deepcopy(data or {})
    if state == "present":
        result["IamInstanceProfile"] = desired.as_template_data()
    else:
        result.pop("IamInstanceProfile", None)
    return result


class ProfileChange:
    """The launch template side of rolling an instance profile (see :func:`plan_template_change`)."""

    report_key = "profile"

    def __init__(self, desired, state):
        self.desired = desired
        self.state = state

    def current(self, data):
        return profile_display((data or {}).get("IamInstanceProfile"))

    def satisfied(self, data):
        matches = self.desired.matches((data or {}).get("IamInstanceProfile"))
        return matches if self.state == "present" else not matches

    def full_data(self, data):
        return patched_data(data, self.desired, self.state)

    def request(self, base, full):
        if self.state == "present":
            # Only IamInstanceProfile is sent; EC2 copies the rest from SourceVersion.
            return {"SourceVersion": str(base), "LaunchTemplateData": {"IamInstanceProfile": self.desired.as_template_data()}}
        # A field cannot be removed through SourceVersion: send the whole data without it.
        return {"LaunchTemplateData": full}

    def description(self, full):
        if self.state == "present":
            return "fleetkeeper.aws.asg_instance_profile: instance profile " + (
                profile_display(full.get("IamInstanceProfile")) or "")
        return "fleetkeeper.aws.asg_instance_profile: instance profile removed"


def plan_template(ref, template, desired, state, version_mode):
    """:func:`plan_template_change` for an instance profile (``desired`` a ProfileRef, ``state`` present/absent)."""
    return plan_template_change(ref, template, ProfileChange(desired, state), version_mode)


def _version_mode(spec_before, version_mode):
    """The version mode a group ends up in: ``keep`` is the mode the group's Version spec already follows."""
    if version_mode != VERSION_KEEP:
        return version_mode
    return {LATEST: VERSION_LATEST, DEFAULT: VERSION_DEFAULT}.get(follows(spec_before), VERSION_PINNED)


def _spec_after(mode, spec_before, target):
    """The group's Version spec after the change (``target``: the version it will use)."""
    if mode == VERSION_LATEST:
        return LATEST
    if mode == VERSION_DEFAULT:
        return spec_before if follows(spec_before) == DEFAULT else DEFAULT
    return str(target)


def _new_plan(ref, template, change, current):
    """A template plan's "before" half (the group uses version ``current``), nothing to do yet."""
    return {
        "source": ref["source"],
        "launch_template_id": template.id,
        "launch_template_name": template.name,
        "follows": follows(ref["version"]),
        "spec_before": ref["version"],
        "version_before": current,
        f"{change.report_key}_before": change.current(template.versions.get(current)),
        "create_version": None,
        "set_default": False,
        "update_group": False,
    }


def plan_template_change(ref, template, change, version_mode):
    """Decide what one group's launch template reference needs for one setting (``change``).

    ``change`` is the setting rolled out (:class:`ProfileChange`, or the metadata options' change in
    ``metadata_options_plan.py``): ``satisfied(data)`` says whether version data already has it,
    ``full_data(data)`` is what a new version will hold, ``request(base, full)`` the
    CreateLaunchTemplateVersion arguments, ``current(data)`` what to report, ``report_key`` the report's
    key prefix (``profile`` -> ``profile_before``/``profile_after``).

    Returns a dict:
      follows: what the group follows now ($Latest / $Default / pinned)
      version_before / version_after: the version number the group uses before and after
      spec_before / spec_after: the Version spec in the group before and after
      <report_key>_before / <report_key>_after: the setting those versions carry
      create_version: None or {"source_version", "request" (sent), "full_data" (what the version will hold)}
      set_default: True if the template's default version must move to the new version
      update_group: True if the group's Version spec must change
    ``template`` is a TemplateState; this function does not change it.
    """
    spec_before = ref["version"]
    current = template.resolve(spec_before)
    mode = _version_mode(spec_before, version_mode)
    # The version the group will follow if nothing is created: the base for a new one.
    base = {VERSION_LATEST: template.latest, VERSION_DEFAULT: template.default}.get(mode, current)
    base_data = template.versions.get(base)
    if base_data is None:
        raise GroupError(f"launch template {template.name or template.id} version {base} was not read")
    key = change.report_key
    plan = _new_plan(ref, template, change, current)
    target = base
    after_data = base_data
    if not change.satisfied(base_data):
        target = template.latest + 1
        after_data = change.full_data(base_data)
        plan["create_version"] = {"source_version": base, "request": change.request(base, after_data),
                                  "full_data": after_data, "number": target,
                                  "description": change.description(after_data)[:255]}
        plan["set_default"] = mode == VERSION_DEFAULT
    spec_after = _spec_after(mode, spec_before, target)
    plan["spec_after"] = spec_after
    plan["version_after"] = target
    plan[f"{key}_after"] = change.current(after_data)
    plan["update_group"] = spec_after != spec_before
    plan["changed"] = bool(plan["create_version"] or plan["update_group"] or plan["set_default"])
    return plan


def group_update_request(group, plans):
    """UpdateAutoScalingGroup arguments that point ``group`` at the planned versions, or None."""
    if not any(p["update_group"] for p in plans):
        return None
    by_source = {p["source"]: p for p in plans}
    request = {"AutoScalingGroupName": group["AutoScalingGroupName"]}

    def spec(original, plan):
        out = {}
        if original.get("LaunchTemplateId"):
            out["LaunchTemplateId"] = original["LaunchTemplateId"]
        else:
            out["LaunchTemplateName"] = original["LaunchTemplateName"]
        version = plan["spec_after"] if plan else original.get("Version")
        if version is not None:
            out["Version"] = version
        return out

    if group.get("LaunchTemplate"):
        request["LaunchTemplate"] = spec(group["LaunchTemplate"], by_source.get("LaunchTemplate"))
    policy = group.get("MixedInstancesPolicy")
    if policy:
        template = policy.get("LaunchTemplate") or {}
        new_template = {}
        if template.get("LaunchTemplateSpecification"):
            new_template["LaunchTemplateSpecification"] = spec(
                template["LaunchTemplateSpecification"], by_source.get("MixedInstancesPolicy")
            )
        overrides = []
        for index, override in enumerate(template.get("Overrides") or []):
            override = copy.deepcopy(override)
            if override.get("LaunchTemplateSpecification"):
                override["LaunchTemplateSpecification"] = spec(
                    override["LaunchTemplateSpecification"], by_source.get(f"MixedInstancesPolicy.Overrides[{index}]")
                )
            overrides.append(override)
        if overrides:
            new_template["Overrides"] = overrides
        request["MixedInstancesPolicy"] = {"LaunchTemplate": new_template}
    return request


# --------------------------------------------------------------------------
# Instances: pure planning
# --------------------------------------------------------------------------


def current_association(associations):
    """The association that counts for one instance: the live one, else a disassociating one, else None."""
    live = [a for a in associations if a.get("State") in LIVE_STATES]
    if live:
        return live[0]
    pending = [a for a in associations if a.get("State") == DISASSOCIATING]
    return pending[0] if pending else None


def plan_instance(instance_id, associations, desired, state, replace):
    """Decide what one InService instance needs from its association records."""
    assoc = current_association(associations)
    before = None
    assoc_id = None
    assoc_state = None
    if assoc:
        before = (assoc.get("IamInstanceProfile") or {}).get("Arn")
        assoc_id = assoc.get("AssociationId")
        assoc_state = assoc.get("State")
    plan = {
        "instance_id": instance_id,
        "association_id": assoc_id,
        "association_state": assoc_state,
        "profile_before": before if assoc_state in LIVE_STATES else None,
        "action": ACTION_NONE,
        "profile_after": before if assoc_state in LIVE_STATES else None,
        "wait_for_disassociation": assoc_state == DISASSOCIATING,
    }
    if state == "present":
        if assoc_state in LIVE_STATES and desired.matches(before):
            return plan
        if assoc_state in LIVE_STATES:
            if not replace:
                plan["action"] = ACTION_MISMATCH
                return plan
            plan["action"] = ACTION_REPLACE
        else:
            plan["action"] = ACTION_ASSOCIATE
        plan["profile_after"] = desired.display()
        return plan
    # absent: detach only this profile; another profile is not ours to remove.
    if assoc_state in LIVE_STATES and desired.matches(before):
        plan["action"] = ACTION_DISASSOCIATE
        plan["profile_after"] = None
    elif assoc_state in LIVE_STATES:
        plan["action"] = ACTION_MISMATCH
    return plan


def in_service(group):
    """(instance ids InService, [{instance_id, lifecycle_state}] of the others) of one group."""
    ready, skipped = [], []
    for instance in group.get("Instances") or []:
        if instance.get("LifecycleState") == IN_SERVICE:
            ready.append(instance["InstanceId"])
        else:
            skipped.append({"instance_id": instance["InstanceId"], "lifecycle_state": instance.get("LifecycleState")})
    return ready, skipped


def bucket_by_template(groups_with_templates):
    """Lists of groups to roll in sequence: groups sharing any launch template share a list.

    ``groups_with_templates`` is [(group, {template ids})]. Lists can run
    concurrently without two of them creating versions of one template.
    """
    buckets = []  # [(template ids, [groups])]
    for group, ids in groups_with_templates:
        merged_ids, merged_groups = set(ids), [group]
        rest = []
        for bucket_ids, bucket_groups in buckets:
            if bucket_ids & merged_ids:
                merged_ids |= bucket_ids
                merged_groups = bucket_groups + merged_groups
            else:
                rest.append((bucket_ids, bucket_groups))
        buckets = rest + [(merged_ids, merged_groups)]
    return [bucket_groups for _ids, bucket_groups in buckets]


def summarise(groups):
    """Counts over the per-group results."""
    summary = {
        "groups": len(groups),
        "groups_changed": 0,
        "groups_failed": 0,
        "instances": 0,
        "associated": 0,
        "replaced": 0,
        "disassociated": 0,
        "mismatched": 0,
        "unchanged": 0,
        "failed": 0,
        "skipped": 0,
        "launch_template_versions_created": 0,
    }
    counters = {
        ACTION_ASSOCIATE: "associated",
        ACTION_REPLACE: "replaced",
        ACTION_DISASSOCIATE: "disassociated",
        ACTION_MISMATCH: "mismatched",
        ACTION_NONE: "unchanged",
    }
    for group in groups:
        summary["groups_changed"] += 1 if group.get("changed") else 0
        summary["groups_failed"] += 1 if group.get("status") == "failed" else 0
        summary["skipped"] += len(group.get("skipped_instances") or [])
        for template in group.get("launch_templates") or []:
            if template.get("created_version"):
                summary["launch_template_versions_created"] += 1
        for instance in group.get("instances") or []:
            summary["instances"] += 1
            if instance.get("error"):
                summary["failed"] += 1
            elif instance.get("done", True):
                summary[counters[instance["action"]]] += 1
    return summary


def template_diff(group, report_key, label, before, after):
    """Add the launch template references of ``group`` that change to the diff halves ``before``/``after``."""
    for template in group.get("launch_templates") or []:
        if not template.get("changed"):
            continue
        key = f"{template['source']} {template['launch_template_name'] or template['launch_template_id']}"
        before[key] = {"version": template["spec_before"], "uses_version": template["version_before"],
                       label: template[f"{report_key}_before"]}
        after[key] = {"version": template["spec_after"], "uses_version": template["version_after"],
                      label: template[f"{report_key}_after"]}


def build_diff(groups):
    """Ansible diff: per group, the launch template and instances that change (before/after)."""
    before, after = {}, {}
    for group in groups:
        b, a = {}, {}
        template_diff(group, "profile", "instance_profile", b, a)
        changes = [i for i in group.get("instances") or [] if i["action"] in CHANGING_ACTIONS]
        if changes:
            b["instances"] = {i["instance_id"]: i["profile_before"] for i in changes}
            a["instances"] = {i["instance_id"]: i["profile_after"] for i in changes}
        if group.get("instance_refresh"):
            b["instance_refresh"] = None
            a["instance_refresh"] = group["instance_refresh"]
        if b or a:
            before[group["name"]] = b
            after[group["name"]] = a
    return {"before": before, "after": after}

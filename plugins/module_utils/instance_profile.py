# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Roll an IAM instance profile onto Auto Scaling groups: planning and applying.

The module ``fleetkeeper.aws.asg_instance_profile`` is a thin door onto this
file. It has two halves:

* Pure planning (no API calls): :func:`plan_template` decides whether a launch
  template needs a new version and what the group must point at;
  :func:`plan_instance` decides, from an instance's association records, whether
  it is associated, replaced, disassociated, left alone as a mismatch, or fine.
  Both take plain dictionaries as botocore returns them, so unit tests feed
  them directly.
* :class:`Roller` makes the API calls: it reads the groups, their templates and
  the associations in batches, runs the plans, and applies them (instances in a
  bounded thread pool), retrying IAM's eventual consistency and falling back
  from a refused replace to disassociate + associate.

Errors are raised as :class:`InstanceProfileError` subclasses; the module turns
them into ``fail_json`` in one place.
"""

from __future__ import annotations

import copy
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_groups import GroupSelectionError
from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_groups import chunks
from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_groups import find_groups as select_groups

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
    def __init__(self, action, exc):
        code = error_code(exc)
        detail = error_message(exc) or str(exc)
        super().__init__(f"{action} failed: {code + ': ' if code else ''}{detail}")
        self.code = code
        self.original = exc


def error_code(exc):
    response = getattr(exc, "response", None) or {}
    return (response.get("Error") or {}).get("Code") or ""


def error_message(exc):
    response = getattr(exc, "response", None) or {}
    return (response.get("Error") or {}).get("Message") or ""


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


def plan_template(ref, template, desired, state, version_mode):
    """Decide what one group's launch template reference needs.

    Returns a dict:
      follows: what the group follows now ($Latest / $Default / pinned)
      version_before / version_after: the version number the group uses before and after
      spec_before / spec_after: the Version spec in the group before and after
      profile_before / profile_after: the instance profile those versions carry
      create_version: None or {"source_version", "data" (patch sent), "full_data" (what the version will hold)}
      set_default: True if the template's default version must move to the new version
      update_group: True if the group's Version spec must change
    ``template`` is a TemplateState; this function does not change it.
    """
    spec_before = ref["version"]
    current = template.resolve(spec_before)
    mode = version_mode
    if mode == VERSION_KEEP:
        kind = follows(spec_before)
        mode = {LATEST: VERSION_LATEST, DEFAULT: VERSION_DEFAULT}.get(kind, VERSION_PINNED)
    # The version the group will follow if nothing is created: the base for a new one.
    if mode == VERSION_LATEST:
        base = template.latest
    elif mode == VERSION_DEFAULT:
        base = template.default
    else:
        base = current
    base_data = template.versions.get(base)
    if base_data is None:
        raise GroupError(f"launch template {template.name or template.id} version {base} was not read")
    profile_before_spec = (template.versions.get(current) or {}).get("IamInstanceProfile")
    base_profile = base_data.get("IamInstanceProfile")
    if state == "present":
        wanted = desired.matches(base_profile)
    else:
        wanted = not desired.matches(base_profile)

    plan = {
        "source": ref["source"],
        "launch_template_id": template.id,
        "launch_template_name": template.name,
        "follows": follows(spec_before),
        "spec_before": spec_before,
        "version_before": current,
        "profile_before": profile_display(profile_before_spec),
        "create_version": None,
        "set_default": False,
        "update_group": False,
    }
    target = base
    after_profile = base_profile
    if not wanted:
        target = template.latest + 1
        full = patched_data(base_data, desired, state)
        if state == "present":
            # Only IamInstanceProfile is sent; EC2 copies the rest from SourceVersion.
            request = {"SourceVersion": str(base), "LaunchTemplateData": {"IamInstanceProfile": desired.as_template_data()}}
        else:
            # A field cannot be removed through SourceVersion: send the whole data without it.
            request = {"LaunchTemplateData": full}
        plan["create_version"] = {"source_version": base, "request": request, "full_data": full, "number": target}
        after_profile = full.get("IamInstanceProfile")
        plan["set_default"] = mode == VERSION_DEFAULT
    if mode == VERSION_LATEST:
        spec_after = LATEST
    elif mode == VERSION_DEFAULT:
        spec_after = spec_before if follows(spec_before) == DEFAULT else DEFAULT
    else:
        spec_after = str(target)
    plan["spec_after"] = spec_after
    plan["version_after"] = target
    plan["profile_after"] = profile_display(after_profile)
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


def build_diff(groups):
    """Ansible diff: per group, the launch template and instances that change (before/after)."""
    before, after = {}, {}
    for group in groups:
        b, a = {}, {}
        for template in group.get("launch_templates") or []:
            if not template.get("changed"):
                continue
            key = f"{template['source']} {template['launch_template_name'] or template['launch_template_id']}"
            b[key] = {"version": template["spec_before"], "uses_version": template["version_before"],
                      "instance_profile": template["profile_before"]}
            a[key] = {"version": template["spec_after"], "uses_version": template["version_after"],
                      "instance_profile": template["profile_after"]}
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


# --------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------


class Options:
    def __init__(self, state="present", replace=False, version_mode=VERSION_KEEP, manage_launch_template=True,
                 manage_instances=True, instance_refresh=False, instance_refresh_preferences=None,
                 max_concurrency=10, wait_timeout=120, check_mode=False):
        if version_mode not in VERSION_CHOICES:
            raise InputError(f"launch_template_version must be one of {', '.join(VERSION_CHOICES)}")
        if max_concurrency < 1:
            raise InputError("max_concurrency must be at least 1")
        self.state = state
        self.replace = replace
        self.version_mode = version_mode
        self.manage_launch_template = manage_launch_template
        self.manage_instances = manage_instances
        self.instance_refresh = instance_refresh
        self.instance_refresh_preferences = instance_refresh_preferences
        self.max_concurrency = max_concurrency
        self.wait_timeout = wait_timeout
        self.check_mode = check_mode


class Roller:
    """Applies one instance profile to a set of Auto Scaling groups.

    ``ec2``, ``autoscaling`` and ``iam`` are boto3 clients (usually amazon.aws's
    retrying wrappers: every call passes ``aws_retry=True``). ``sleep`` and
    ``clock`` are injectable for tests.
    """

    def __init__(self, ec2, autoscaling, iam, options, sleep=time.sleep, clock=time.monotonic, warn=None):
        self.ec2 = ec2
        self.autoscaling = autoscaling
        self.iam = iam
        self.options = options
        self.sleep = sleep
        self.clock = clock
        self.warnings = []
        self._warn = warn

    def warn(self, message):
        self.warnings.append(message)
        if self._warn:
            self._warn(message)

    # --- reading ----------------------------------------------------------
    def resolve_profile(self, profile):
        """ProfileRef for a name or ARN; waits for a just-created profile (present, not in check mode)."""
        name = profile_name_from_arn(profile) if is_profile_arn(profile) else profile
        try:
            record = self.iam.get_instance_profile(InstanceProfileName=name, aws_retry=True)["InstanceProfile"]
        except Exception as exc:  # pylint: disable=broad-except
            if error_code(exc) not in PROFILE_NOT_FOUND_CODES:
                raise AwsCallError(f"GetInstanceProfile {name}", exc) from exc
            record = None
        if record is None and self.options.state == "present" and not self.options.check_mode:
            record = self._wait_for_profile(name)
        if record is None:
            if self.options.check_mode and self.options.state == "present":
                self.warn(f"instance profile {name!r} does not exist yet: planned as if it did (check mode)")
                return ProfileRef(name, profile if is_profile_arn(profile) else None)
            raise ProfileNotFoundError(name)
        if is_profile_arn(profile) and record["Arn"] != profile:
            raise InputError(f"instance profile {name!r} has ARN {record['Arn']}, not {profile}: fix the ARN")
        return ProfileRef(record["InstanceProfileName"], record["Arn"])

    def _wait_for_profile(self, name):
        """IAM is eventually consistent: a profile created a moment ago may not be visible yet."""
        delay = max(1, min(5, self.options.wait_timeout // 10 or 1))
        attempts = max(1, int(self.options.wait_timeout // delay))
        try:
            waiter = self.iam.get_waiter("instance_profile_exists")
            waiter.wait(InstanceProfileName=name, WaiterConfig={"Delay": delay, "MaxAttempts": attempts})
        except Exception as exc:  # pylint: disable=broad-except
            # botocore's WaiterError: "Max attempts exceeded" means the profile never appeared;
            # anything else (access denied, a terminal failure) is an error of its own.
            if "Max attempts exceeded" in str(exc) or error_code(exc) in PROFILE_NOT_FOUND_CODES:
                return None
            raise AwsCallError(f"waiting for instance profile {name}", exc) from exc
        return self.iam.get_instance_profile(InstanceProfileName=name, aws_retry=True)["InstanceProfile"]

    def find_groups(self, names=None, tag_filters=None):
        """Describe the groups named and/or matching the tag filters; unknown names are an InputError."""
        try:
            return select_groups(self.autoscaling, names, tag_filters)
        except GroupSelectionError as exc:
            raise InputError(str(exc)) from exc
        except Exception as exc:  # pylint: disable=broad-except
            raise AwsCallError("DescribeAutoScalingGroups", exc) from exc

    def _pages(self, method, key, action, params):
        token = None
        while True:
            call = dict(params)
            if token:
                call["NextToken"] = token
            try:
                page = method(aws_retry=True, **call)
            except Exception as exc:  # pylint: disable=broad-except
                raise AwsCallError(action, exc) from exc
            yield from page.get(key) or []
            token = page.get("NextToken")
            if not token:
                return

    def read_template(self, ref, pinned_versions):
        """TemplateState with $Latest, $Default and the pinned versions the groups use."""
        versions = [LATEST, DEFAULT] + sorted({str(v) for v in pinned_versions}, key=int)
        params = {"Versions": versions}
        if ref["id"]:
            params["LaunchTemplateId"] = ref["id"]
        else:
            params["LaunchTemplateName"] = ref["name"]
        label = ref["name"] or ref["id"]
        try:
            records = self.ec2.describe_launch_template_versions(aws_retry=True, **params)["LaunchTemplateVersions"]
        except Exception as exc:  # pylint: disable=broad-except
            if error_code(exc) in TEMPLATE_NOT_FOUND_CODES:
                raise GroupError(
                    f"launch template {label} (versions {', '.join(versions)}) not found: "
                    f"{error_message(exc) or error_code(exc)}. Point the group at an existing launch template"
                ) from exc
            raise AwsCallError(f"DescribeLaunchTemplateVersions {label}", exc) from exc
        if not records:
            raise GroupError(f"launch template {label} not found. Point the group at an existing launch template")
        return TemplateState.from_versions(records)

    def read_associations(self, instance_ids):
        """{instance id: [association records]} for the instances, batched, batches concurrently."""
        found = {i: [] for i in instance_ids}
        batches = list(chunks(list(instance_ids), ASSOCIATION_BATCH_SIZE))

        def one(batch):
            params = {"Filters": [{"Name": "instance-id", "Values": batch}], "MaxResults": ASSOCIATION_PAGE_SIZE}
            return list(self._pages(self.ec2.describe_iam_instance_profile_associations,
                                    "IamInstanceProfileAssociations", "DescribeIamInstanceProfileAssociations", params))

        for records in self._map(one, batches):
            for record in records:
                found.setdefault(record["InstanceId"], []).append(record)
        return found

    def _map(self, func, items):
        items = list(items)
        if len(items) <= 1 or self.options.max_concurrency == 1:
            return [func(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.options.max_concurrency, len(items))) as pool:
            return list(pool.map(func, items))

    # --- whole run ----------------------------------------------------------
    def run(self, profile, names=None, tag_filters=None):
        """Plan everything, fail before any change on bad input, then apply; returns the result dict."""
        desired = self.resolve_profile(profile)
        groups = self.find_groups(names, tag_filters)
        results = {g["AutoScalingGroupName"]: self._new_result(g) for g in groups}

        # Plan launch templates (reads only) and stop on bad input before touching anything.
        templates = {}
        refs_by_group = {}
        problems = []
        if self.options.manage_launch_template:
            for group in groups:
                name = group["AutoScalingGroupName"]
                try:
                    refs_by_group[name] = template_references(group)
                except GroupError as exc:
                    results[name]["status"] = "failed"
                    results[name]["error"] = str(exc)
                    problems.append(name)
            pinned = {}
            first_ref = {}
            for refs in refs_by_group.values():
                for ref in refs:
                    key = ref["id"] or ref["name"]
                    first_ref.setdefault(key, ref)
                    if follows(ref["version"]) == "pinned":
                        pinned.setdefault(key, set()).add(ref["version"])

            def read(key):
                try:
                    return key, self.read_template(first_ref[key], pinned.get(key, ())), None
                except InstanceProfileError as exc:
                    return key, None, exc

            for key, state, exc in self._map(read, sorted(first_ref)):
                if exc is not None:
                    for name, refs in refs_by_group.items():
                        if any((r["id"] or r["name"]) == key for r in refs):
                            results[name]["status"] = "failed"
                            results[name]["error"] = f"Auto Scaling group {name!r}: {exc}"
                            if name not in problems:
                                problems.append(name)
                else:
                    templates[key] = state
                    if state.id != key:
                        templates[state.id] = state
        if problems:
            ordered = list(results.values())
            raise PlanningError(
                "nothing was changed: "
                + "; ".join(results[name]["error"] for name in sorted(problems)),
                ordered,
            )

        # Launch templates: groups sharing a template in sequence, templates concurrently.
        by_template = bucket_by_template(
            [(g, {templates[r["id"] or r["name"]].id for r in refs_by_group.get(g["AutoScalingGroupName"], [])})
             for g in groups if g["AutoScalingGroupName"] in refs_by_group]
        )

        def roll_templates(template_groups):
            for group in template_groups:
                self._roll_group_templates(group, refs_by_group.get(group["AutoScalingGroupName"], []),
                                           templates, desired, results[group["AutoScalingGroupName"]])

        if self.options.manage_launch_template:
            self._map(roll_templates, by_template)

        # Instances: plan from batched association reads, apply in the thread pool.
        if self.options.manage_instances:
            ready_groups = [g for g in groups if results[g["AutoScalingGroupName"]]["status"] != "failed"]
            instance_ids = []
            for group in ready_groups:
                ready, skipped = in_service(group)
                results[group["AutoScalingGroupName"]]["skipped_instances"] = skipped
                instance_ids.extend(ready)
            associations = self.read_associations(instance_ids) if instance_ids else {}
            work = []
            for group in ready_groups:
                result = results[group["AutoScalingGroupName"]]
                ready, _skipped = in_service(group)
                for instance_id in ready:
                    plan = plan_instance(instance_id, associations.get(instance_id, []), desired,
                                         self.options.state, self.options.replace)
                    result["instances"].append(plan)
                    if plan["action"] in CHANGING_ACTIONS:
                        work.append((result, plan))
            if not self.options.check_mode and work:
                self._map(lambda item: self._apply_instance(item[1], desired), work)
            for result, plan in work:
                if not plan.get("error"):
                    result["changed"] = True
            for result in results.values():
                errors = [i["error"] for i in result["instances"] if i.get("error")]
                if errors:
                    result["status"] = "failed"
                    result["error"] = (
                        f"Auto Scaling group {result['name']!r}: {len(errors)} instance(s) could not be changed "
                        f"(the others were), first error: {errors[0]}"
                    )

        for result in results.values():
            if result["status"] != "failed":
                result["status"] = "changed" if result["changed"] else "ok"
            mismatched = [i["instance_id"] for i in result["instances"] if i["action"] == ACTION_MISMATCH]
            result["mismatched"] = mismatched
        ordered = [results[name] for name in sorted(results)]
        mismatched = [i for r in ordered for i in r["mismatched"]]
        if mismatched and self.options.state == "present":
            self.warn(
                f"{len(mismatched)} instance(s) carry another instance profile and were left alone "
                f"(set replace: true to replace it): {', '.join(mismatched[:20])}{' ...' if len(mismatched) > 20 else ''}"
            )
        return {
            "changed": any(r["changed"] for r in ordered),
            "instance_profile": desired.to_dict(),
            "groups": ordered,
            "summary": summarise(ordered),
            "mismatched": mismatched,
            "failed_groups": [r["name"] for r in ordered if r["status"] == "failed"],
            "diff": build_diff(ordered),
        }

    @staticmethod
    def _new_result(group):
        return {
            "name": group["AutoScalingGroupName"],
            "status": "ok",
            "changed": False,
            "error": None,
            "launch_templates": [],
            "instance_refresh": None,
            "instances": [],
            "skipped_instances": [],
            "mismatched": [],
        }

    def _roll_group_templates(self, group, refs, templates, desired, result):
        name = group["AutoScalingGroupName"]
        try:
            plans = []
            for ref in refs:
                template = templates[ref["id"] or ref["name"]]
                plan = plan_template(ref, template, desired, self.options.state, self.options.version_mode)
                plans.append(plan)
                if plan["create_version"]:
                    self._create_version(template, plan)
                elif plan["set_default"]:
                    self._set_default(template, plan["version_after"])
            request = group_update_request(group, plans)
            if request and not self.options.check_mode:
                try:
                    self.autoscaling.update_auto_scaling_group(aws_retry=True, **request)
                except Exception as exc:  # pylint: disable=broad-except
                    raise AwsCallError(f"UpdateAutoScalingGroup {name}", exc) from exc
            result["launch_templates"] = [public_template_plan(p) for p in plans]
            if any(p["changed"] for p in plans):
                result["changed"] = True
            if self.options.instance_refresh and any(p["create_version"] for p in plans):
                result["instance_refresh"] = self._start_refresh(name)
        except InstanceProfileError as exc:
            result["status"] = "failed"
            result["error"] = f"Auto Scaling group {name!r}: {exc}"
            result["launch_templates"] = result["launch_templates"] or []

    def _create_version(self, template, plan):
        create = plan["create_version"]
        make_default = plan["set_default"]
        number = create["number"]
        if not self.options.check_mode:
            description = "fleetkeeper.aws.asg_instance_profile: " + (
                "instance profile " + (profile_display(create["full_data"].get("IamInstanceProfile")) or "")
                if self.options.state == "present" else "instance profile removed"
            )
            try:
                answer = self.ec2.create_launch_template_version(
                    aws_retry=True, LaunchTemplateId=template.id, VersionDescription=description[:255],
                    **create["request"]
                )["LaunchTemplateVersion"]
            except Exception as exc:  # pylint: disable=broad-except
                raise AwsCallError(f"CreateLaunchTemplateVersion {template.name or template.id}", exc) from exc
            number = int(answer["VersionNumber"])
            if make_default:
                self._set_default(template, number)
        template.record_version(number, create["full_data"], make_default=make_default)
        plan["created_version"] = number
        plan["version_after"] = number
        if plan["spec_after"] not in (LATEST, DEFAULT, None):
            plan["spec_after"] = str(number)
            plan["update_group"] = plan["spec_after"] != plan["spec_before"]

    def _set_default(self, template, number):
        if not self.options.check_mode:
            try:
                self.ec2.modify_launch_template(aws_retry=True, LaunchTemplateId=template.id,
                                                DefaultVersion=str(number))
            except Exception as exc:  # pylint: disable=broad-except
                raise AwsCallError(f"ModifyLaunchTemplate {template.name or template.id}", exc) from exc
        template.default = number

    def _start_refresh(self, name):
        if self.options.check_mode:
            return {"id": None, "would_start": True}
        params = {"AutoScalingGroupName": name}
        if self.options.instance_refresh_preferences:
            params["Preferences"] = self.options.instance_refresh_preferences
        try:
            answer = self.autoscaling.start_instance_refresh(aws_retry=True, **params)
        except Exception as exc:  # pylint: disable=broad-except
            if error_code(exc) == "InstanceRefreshInProgress":
                self.warn(f"Auto Scaling group {name!r}: an instance refresh is already in progress; none started")
                return {"id": None, "in_progress": True}
            raise AwsCallError(f"StartInstanceRefresh {name}", exc) from exc
        return {"id": answer.get("InstanceRefreshId")}

    # --- one instance -------------------------------------------------------
    def _apply_instance(self, plan, desired):
        """Carry out one instance's plan; records ``error`` on the plan instead of raising."""
        try:
            if plan["wait_for_disassociation"]:
                self._wait_until_unassociated(plan["instance_id"])
            if plan["action"] == ACTION_ASSOCIATE:
                self._associate(plan, desired)
            elif plan["action"] == ACTION_REPLACE:
                self._replace(plan, desired)
            elif plan["action"] == ACTION_DISASSOCIATE:
                self._disassociate(plan["association_id"], plan["instance_id"])
            plan["done"] = True
        except InstanceProfileError as exc:
            plan["error"] = str(exc)
            plan["done"] = False
        except Exception as exc:  # pylint: disable=broad-except
            plan["error"] = f"{plan['action']} {plan['instance_id']} failed: {exc}"
            plan["done"] = False

    def _iam_retry(self, action, call):
        """Retry EC2's 'Invalid IAM Instance Profile' (IAM not yet propagated) with backoff up to wait_timeout."""
        deadline = self.clock() + self.options.wait_timeout
        delay = 1.0
        while True:
            try:
                return call()
            except Exception as exc:  # pylint: disable=broad-except
                if not is_iam_not_ready(exc) or self.clock() + delay > deadline:
                    raise
                self.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 15.0)

    def _associate(self, plan, desired):
        instance_id = plan["instance_id"]
        try:
            answer = self._iam_retry("associate", lambda: self.ec2.associate_iam_instance_profile(
                aws_retry=True, InstanceId=instance_id, IamInstanceProfile={"Arn": desired.arn}))
        except Exception as exc:  # pylint: disable=broad-except
            if error_code(exc) != INCORRECT_STATE:
                raise AwsCallError(f"AssociateIamInstanceProfile {instance_id}", exc) from exc
            # Someone associated it since we looked: look again and act on what is there.
            assoc = current_association(self._instance_associations(instance_id))
            arn = (assoc or {}).get("IamInstanceProfile", {}).get("Arn")
            if assoc and assoc.get("State") in LIVE_STATES and desired.matches(arn):
                plan["association_id"] = assoc["AssociationId"]
                return
            if assoc and assoc.get("State") in LIVE_STATES and self.options.replace:
                plan["association_id"] = assoc["AssociationId"]
                plan["profile_before"] = arn
                plan["action"] = ACTION_REPLACE
                self._replace(plan, desired)
                return
            raise AwsCallError(f"AssociateIamInstanceProfile {instance_id}", exc) from exc
        plan["association_id"] = answer["IamInstanceProfileAssociation"]["AssociationId"]

    def _replace(self, plan, desired):
        instance_id = plan["instance_id"]
        try:
            answer = self._iam_retry("replace", lambda: self.ec2.replace_iam_instance_profile_association(
                aws_retry=True, AssociationId=plan["association_id"], IamInstanceProfile={"Arn": desired.arn}))
        except Exception as exc:  # pylint: disable=broad-except
            if error_code(exc) not in (INCORRECT_STATE, ASSOCIATION_NOT_FOUND):
                raise AwsCallError(f"ReplaceIamInstanceProfileAssociation {instance_id}", exc) from exc
            # Replace is refused while the association is changing (or the instance is stopped):
            # fall back to disassociate, wait until it is gone, associate.
            plan["fallback"] = "disassociate+associate"
            if error_code(exc) == INCORRECT_STATE:
                self._disassociate(plan["association_id"], instance_id)
            self._wait_until_unassociated(instance_id)
            answer = self._iam_retry("associate", lambda: self.ec2.associate_iam_instance_profile(
                aws_retry=True, InstanceId=instance_id, IamInstanceProfile={"Arn": desired.arn}))
        plan["association_id"] = answer["IamInstanceProfileAssociation"]["AssociationId"]

    def _disassociate(self, association_id, instance_id):
        try:
            self.ec2.disassociate_iam_instance_profile(aws_retry=True, AssociationId=association_id)
        except Exception as exc:  # pylint: disable=broad-except
            if error_code(exc) == ASSOCIATION_NOT_FOUND:
                return  # already gone
            if error_code(exc) == INCORRECT_STATE:
                # Still associating: wait for it to settle, then try once more.
                self._wait_for_state(instance_id, association_id, (ASSOCIATED,))
                try:
                    self.ec2.disassociate_iam_instance_profile(aws_retry=True, AssociationId=association_id)
                    return
                except Exception as again:  # pylint: disable=broad-except
                    if error_code(again) == ASSOCIATION_NOT_FOUND:
                        return
                    raise AwsCallError(f"DisassociateIamInstanceProfile {instance_id}", again) from again
            raise AwsCallError(f"DisassociateIamInstanceProfile {instance_id}", exc) from exc

    def _instance_associations(self, instance_id):
        params = {"Filters": [{"Name": "instance-id", "Values": [instance_id]}]}
        return list(self._pages(self.ec2.describe_iam_instance_profile_associations,
                                "IamInstanceProfileAssociations", "DescribeIamInstanceProfileAssociations", params))

    def _poll(self, what, done):
        deadline = self.clock() + self.options.wait_timeout
        delay = 1.0
        while True:
            if done():
                return
            if self.clock() + delay > deadline:
                raise InstanceProfileError(f"timed out after {self.options.wait_timeout}s waiting for {what}")
            self.sleep(delay)
            delay = min(delay * 1.5, 10.0)

    def _wait_until_unassociated(self, instance_id):
        def gone():
            records = self._instance_associations(instance_id)
            return not [a for a in records if a.get("State") in LIVE_STATES + (DISASSOCIATING,)]

        self._poll(f"the instance profile association of {instance_id} to be removed", gone)

    def _wait_for_state(self, instance_id, association_id, states):
        def settled():
            records = [a for a in self._instance_associations(instance_id) if a.get("AssociationId") == association_id]
            return not records or records[0].get("State") in states

        self._poll(f"association {association_id} of {instance_id} to settle", settled)


class PlanningError(InputError):
    """Bad input found while planning: nothing was changed. ``groups`` holds the per-group results."""

    def __init__(self, message, groups):
        super().__init__(message)
        self.groups = groups

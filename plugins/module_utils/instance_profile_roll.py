# -*- coding: utf-8 -*-

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The Auto Scaling roll-outs' orchestration: :class:`GroupRoller` (shared) and :class:`Roller` (instance profile).

:class:`GroupRoller` is what every roll-out over Auto Scaling groups shares: it selects the groups,
reads their launch templates, rolls one setting onto them (versions, the groups' version settings,
instance refresh) and runs work in a bounded thread pool. :class:`Roller` rolls an IAM instance profile:
it plans each instance from its associations (``instance_profile_plan.py``) and applies the plans,
retrying IAM's eventual consistency and falling back from a refused replace to disassociate + associate.
Every AWS call goes through the gateway (``autoscaling_gateway.py``). :class:`RollOptions` and
:class:`Options` are the tasks' settings, each checked once.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import ClassVar

from ansible_collections.fleetkeeper.aws.plugins.module_utils.autoscaling_gateway import bounded_map
from ansible_collections.fleetkeeper.aws.plugins.module_utils.instance_profile_plan import (
    ACTION_ASSOCIATE, ACTION_DISASSOCIATE, ACTION_MISMATCH, ACTION_REPLACE, ASSOCIATED, ASSOCIATION_NOT_FOUND,
    CHANGING_ACTIONS, DEFAULT, DISASSOCIATING, INCORRECT_STATE, LATEST, LIVE_STATES, VERSION_CHOICES, VERSION_KEEP,
    AwsCallError, GroupError, InputError, InstanceProfileError, PlanningError, ProfileChange, ProfileNotFoundError,
    ProfileRef, RollError, TemplateState, bucket_by_template, build_diff, current_association, follows,
    group_update_request, in_service, is_iam_not_ready, is_profile_arn, plan_instance, plan_template_change,
    profile_name_from_arn, public_template_plan, summarise, template_references,
)

MAX_CONCURRENCY = 100


@dataclasses.dataclass(frozen=True)
class RollOptions:
    """What every roll-out over Auto Scaling groups takes (launch templates, instances, concurrency).

    One source for each setting: ``PARAMS`` names the module parameter and type of each field, the field
    gives its default, and :meth:`argument_spec` builds the modules' argument_spec from both. The
    argument_specs check types and choices; the ranges are checked here, once, for the modules and for
    any other caller."""

    # field -> (module parameter, its argument_spec entry without the default)
    PARAMS: ClassVar[dict] = {
        "version_mode": ("launch_template_version", {"type": "str", "choices": list(VERSION_CHOICES)}),
        "manage_launch_template": ("manage_launch_template", {"type": "bool"}),
        "manage_instances": ("manage_instances", {"type": "bool"}),
        "instance_refresh": ("instance_refresh", {"type": "bool"}),
        "instance_refresh_preferences": ("instance_refresh_preferences", {"type": "dict"}),
        "max_concurrency": ("max_concurrency", {"type": "int"}),
    }

    version_mode: str = VERSION_KEEP
    manage_launch_template: bool = True
    manage_instances: bool = True
    instance_refresh: bool = False
    instance_refresh_preferences: dict | None = None
    max_concurrency: int = 10
    check_mode: bool = False

    def __post_init__(self):
        if self.version_mode not in VERSION_CHOICES:  # callers other than the module
            raise InputError(f"launch_template_version must be one of {', '.join(VERSION_CHOICES)}")
        if not 1 <= self.max_concurrency <= MAX_CONCURRENCY:
            raise InputError(f"max_concurrency must be between 1 and {MAX_CONCURRENCY}")

    @classmethod
    def argument_spec(cls):
        """The module parameters of ``PARAMS``, each with its field's default (none where that is None)."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        spec = {}
        for name, (param, entry) in cls.PARAMS.items():
            entry = dict(entry)
            if defaults[name] not in (None, dataclasses.MISSING):
                entry["default"] = defaults[name]
            spec[param] = entry
        return spec

    @classmethod
    def from_params(cls, params, check_mode=False, **derived):
        """Options from the module's parameters (``module.params``); ``derived`` are fields a subclass builds."""
        return cls(check_mode=check_mode, **derived, **{name: params[param] for name, (param, _e) in cls.PARAMS.items()})


@dataclasses.dataclass(frozen=True)
class Options(RollOptions):
    """What the instance profile task asks for."""

    PARAMS: ClassVar[dict] = dict(RollOptions.PARAMS, **{
        "state": ("state", {"type": "str", "choices": ["present", "absent"]}),
        "replace": ("replace", {"type": "bool"}),
        "wait_timeout": ("wait_timeout", {"type": "int"}),
    })

    state: str = "present"
    replace: bool = False
    wait_timeout: int = 120

    def __post_init__(self):
        super().__post_init__()
        if self.wait_timeout < 0:
            raise InputError("wait_timeout must not be negative")


class GroupRoller:
    """What every roll-out over Auto Scaling groups shares: selecting the groups, reading their launch
    templates, rolling one setting onto the templates (versions, group version settings, instance
    refresh), and a bounded thread pool. Subclasses add their instances' side.

    ``gateway`` is an :class:`AutoScalingGateway` (``autoscaling_gateway.py``), the only way to AWS.
    ``sleep`` and ``clock`` are injectable for tests.
    """

    def __init__(self, gateway, options, sleep=time.sleep, clock=time.monotonic, warn=None):
        self.gateway = gateway
        self.options = options
        self.sleep = sleep
        self.clock = clock
        self.warnings = []
        self._warn = warn

    def warn(self, message):
        self.warnings.append(message)
        if self._warn:
            self._warn(message)

    def find_groups(self, names=None, tag_filters=None):
        """Describe the groups named and/or matching the tag filters; unknown names are an InputError."""
        return self.gateway.find_groups(names, tag_filters)

    def read_template(self, ref, pinned_versions):
        """TemplateState with $Latest, $Default and the pinned versions the groups use."""
        versions = [LATEST, DEFAULT] + sorted({str(v) for v in pinned_versions}, key=int)
        return TemplateState.from_versions(self.gateway.template_versions(ref, versions))

    @staticmethod
    def _settle_instances(results, work):
        """After the instances' changes: each group whose instance changed is changed, and a group with failed
        instances fails with their count and the first error (its other instances were changed)."""
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

    def _map(self, func, items):
        return bounded_map(func, items, self.options.max_concurrency)

    @staticmethod
    def _template_refs(groups, results):
        """Each group's launch template references; groups that cannot have them are failed (and named)."""
        refs_by_group = {}
        problems = []
        for group in groups:
            name = group["AutoScalingGroupName"]
            try:
                refs_by_group[name] = template_references(group)
            except GroupError as exc:
                results[name]["status"] = "failed"
                results[name]["error"] = str(exc)
                problems.append(name)
        return refs_by_group, problems

    def _read_templates(self, groups, results):
        """Each group's launch template references and every template's state (reads only).

        Stops with a PlanningError, before anything is changed, when a group's templates cannot be used."""
        refs_by_group, problems = self._template_refs(groups, results)
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

        templates = {}
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
            raise PlanningError(
                "nothing was changed: " + "; ".join(results[name]["error"] for name in sorted(problems)),
                list(results.values()),
            )
        return refs_by_group, templates

    def _roll_templates(self, groups, refs_by_group, templates, change, results):
        """Roll ``change`` onto the launch templates: groups sharing a template in sequence, templates
        concurrently. Groups whose result is not ``ok`` any more (refused while planning) are left alone."""
        by_template = bucket_by_template(
            [(g, {templates[r["id"] or r["name"]].id for r in refs_by_group.get(g["AutoScalingGroupName"], [])})
             for g in groups if g["AutoScalingGroupName"] in refs_by_group
             and results[g["AutoScalingGroupName"]]["status"] == "ok"]
        )

        def roll(template_groups):
            for group in template_groups:
                self._roll_group_templates(group, refs_by_group.get(group["AutoScalingGroupName"], []),
                                           templates, change, results[group["AutoScalingGroupName"]])

        self._map(roll, by_template)

    def _new_result(self, group):
        """A group's result before anything is known; subclasses add their own keys."""
        return {
            "name": group["AutoScalingGroupName"],
            "status": "ok",
            "changed": False,
            "error": None,
            "launch_templates": [],
            "instance_refresh": None,
            "instances": [],
            "skipped_instances": [],
        }

    def _roll_group_templates(self, group, refs, templates, change, result):
        name = group["AutoScalingGroupName"]
        try:
            plans = []
            for ref in refs:
                template = templates[ref["id"] or ref["name"]]
                plan = plan_template_change(ref, template, change, self.options.version_mode)
                plans.append(plan)
                if plan["create_version"]:
                    self._create_version(template, plan)
                elif plan["set_default"]:
                    self._set_default(template, plan["version_after"])
            request = group_update_request(group, plans)
            if request and not self.options.check_mode:
                self.gateway.update_group(name, request)
            result["launch_templates"] = [public_template_plan(p) for p in plans]
            if any(p["changed"] for p in plans):
                result["changed"] = True
            if self.options.instance_refresh and any(p["create_version"] for p in plans):
                result["instance_refresh"] = self._start_refresh(name)
        except RollError as exc:
            result["status"] = "failed"
            result["error"] = f"Auto Scaling group {name!r}: {exc}"
            result["launch_templates"] = result["launch_templates"] or []

    def _create_version(self, template, plan):
        create = plan["create_version"]
        make_default = plan["set_default"]
        number = create["number"]
        if not self.options.check_mode:
            number = self.gateway.create_template_version(template, create["description"], create["request"])
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
            self.gateway.set_default_version(template, number)
        template.default = number

    def _start_refresh(self, name):
        if self.options.check_mode:
            return {"id": None, "would_start": True}
        refresh_id = self.gateway.start_instance_refresh(name, self.options.instance_refresh_preferences)
        if refresh_id is None:
            self.warn(f"Auto Scaling group {name!r}: an instance refresh is already in progress; none started")
            return {"id": None, "in_progress": True}
        return {"id": refresh_id}


class Roller(GroupRoller):
    """Applies one instance profile to a set of Auto Scaling groups (the gateway needs an IAM client)."""

    # --- reading ----------------------------------------------------------
    def resolve_profile(self, profile):
        """ProfileRef for a name or ARN; waits for a just-created profile (present, not in check mode)."""
        name = profile_name_from_arn(profile) if is_profile_arn(profile) else profile
        record = self.gateway.instance_profile(name)
        if record is None and self.options.state == "present" and not self.options.check_mode:
            # IAM is eventually consistent: a profile created a moment ago may not be visible yet.
            delay = max(1, min(5, self.options.wait_timeout // 10 or 1))
            record = self.gateway.wait_for_instance_profile(name, delay, max(1, int(self.options.wait_timeout // delay)))
        if record is None:
            if self.options.check_mode and self.options.state == "present":
                self.warn(f"instance profile {name!r} does not exist yet: planned as if it did (check mode)")
                return ProfileRef(name, profile if is_profile_arn(profile) else None)
            raise ProfileNotFoundError(name)
        if is_profile_arn(profile) and record["Arn"] != profile:
            raise InputError(f"instance profile {name!r} has ARN {record['Arn']}, not {profile}: fix the ARN")
        return ProfileRef(record["InstanceProfileName"], record["Arn"])

    def read_associations(self, instance_ids):
        """{instance id: [association records]} for the instances, batched, batches concurrently."""
        return self.gateway.associations(instance_ids, self.options.max_concurrency)

    def _new_result(self, group):
        result = super()._new_result(group)
        result["mismatched"] = []
        return result

    # --- whole run: named steps ----------------------------------------------
    def run(self, profile, names=None, tag_filters=None):
        """Plan everything, fail before any change on bad input, then apply; returns the result dict."""
        desired = self.resolve_profile(profile)
        groups = self.find_groups(names, tag_filters)
        results = {g["AutoScalingGroupName"]: self._new_result(g) for g in groups}
        if self.options.manage_launch_template:
            refs_by_group, templates = self._read_templates(groups, results)
            self._roll_templates(groups, refs_by_group, templates, ProfileChange(desired, self.options.state), results)
        if self.options.manage_instances:
            self._roll_instances(groups, desired, results)
        return self._report(results, desired)

    def _roll_instances(self, groups, desired, results):
        """Instances: plan from batched association reads, apply in the thread pool."""
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
        self._settle_instances(results, work)

    def _report(self, results, desired):
        """The module's result: per-group status, summary, mismatches, diff."""
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

    def _iam_retry(self, call):
        """Retry EC2's 'Invalid IAM Instance Profile' (IAM not yet propagated) with backoff up to wait_timeout."""
        deadline = self.clock() + self.options.wait_timeout
        delay = 1.0
        while True:
            try:
                return call()
            except AwsCallError as exc:
                if not is_iam_not_ready(exc.original) or self.clock() + delay > deadline:
                    raise
                self.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 15.0)

    def _associate(self, plan, desired):
        instance_id = plan["instance_id"]
        try:
            plan["association_id"] = self._iam_retry(lambda: self.gateway.associate_profile(instance_id, desired.arn))
        except AwsCallError as exc:
            if exc.code != INCORRECT_STATE:
                raise
            # Someone associated it since we looked: look again and act on what is there.
            assoc = current_association(self.gateway.instance_associations(instance_id))
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
            raise

    def _replace(self, plan, desired):
        instance_id = plan["instance_id"]
        association_id = plan["association_id"]
        try:
            plan["association_id"] = self._iam_retry(
                lambda: self.gateway.replace_profile(instance_id, association_id, desired.arn))
        except AwsCallError as exc:
            if exc.code not in (INCORRECT_STATE, ASSOCIATION_NOT_FOUND):
                raise
            # Replace is refused while the association is changing (or the instance is stopped):
            # fall back to disassociate, wait until it is gone, associate.
            plan["fallback"] = "disassociate+associate"
            if exc.code == INCORRECT_STATE:
                self._disassociate(association_id, instance_id)
            self._wait_until_unassociated(instance_id)
            plan["association_id"] = self._iam_retry(lambda: self.gateway.associate_profile(instance_id, desired.arn))

    def _disassociate(self, association_id, instance_id):
        """Disassociate (one already gone is fine); one still associating is awaited, then tried once more."""
        try:
            self.gateway.disassociate_profile(instance_id, association_id)
        except AwsCallError as exc:
            if exc.code != INCORRECT_STATE:
                raise
            self._wait_for_state(instance_id, association_id, (ASSOCIATED,))
            self.gateway.disassociate_profile(instance_id, association_id)

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
            records = self.gateway.instance_associations(instance_id)
            return not [a for a in records if a.get("State") in LIVE_STATES + (DISASSOCIATING,)]

        self._poll(f"the instance profile association of {instance_id} to be removed", gone)

    def _wait_for_state(self, instance_id, association_id, states):
        def settled():
            records = [a for a in self.gateway.instance_associations(instance_id)
                       if a.get("AssociationId") == association_id]
            return not records or records[0].get("State") in states

        self._poll(f"association {association_id} of {instance_id} to settle", settled)

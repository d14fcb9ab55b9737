# -*- coding: utf-8 -*-
# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Runs the ``asg_lifecycle_action`` module as the ``normal`` action does, adding one thing: a heartbeat loop
that runs on the controller (a local connection, ``delegate_to: localhost``) is handed the process id of the
``ansible-playbook`` that started it (``watch_pid``), so a loop started with ``async`` ends with the run, even
a run that was killed. Workers are forked from the ``ansible-playbook`` process, so it is this worker's
parent."""

from __future__ import annotations

import os

from ansible.plugins.action import ActionBase
from ansible.utils.vars import merge_hash


class ActionModule(ActionBase):

    _supports_check_mode = True
    _supports_async = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        wrap_async = self._task.async_val
        module_args = dict(self._task.args)
        if (module_args.get("action") == "heartbeat" and module_args.get("heartbeat_lifetime")
                and module_args.get("watch_pid") is None and self._connection.transport == "local"):
            module_args["watch_pid"] = os.getppid()
        result = merge_hash(result, self._execute_module(module_args=module_args, task_vars=task_vars,
                                                         wrap_async=wrap_async))
        if not wrap_async:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result

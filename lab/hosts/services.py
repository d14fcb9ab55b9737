# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One background process per run: the caching apt proxy on 127.0.0.1 and the
relays from every test network's gateway to it (and to the AWS endpoint).

Started by the launcher as ``python -m lab.hosts.services RUN_DIR``; reads
``RUN_DIR/services.json``, writes ``RUN_DIR/services.ready`` when every socket
is open, and runs until SIGTERM. It is also the run's watchdog: when the run
belongs to a ``molecule test`` process and that process disappears (the job was
killed), it destroys the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from lab.hosts import state as runstate
from lab.hosts.aptproxy import AptProxy
from lab.hosts.relay import Relay, listen


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = argv[0]
    with open(os.path.join(run_dir, "services.json"), encoding="utf-8") as handle:
        spec = json.load(handle)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())

    proxy = AptProxy(spec["apt_cache"], "127.0.0.1", 0, index_ttl=spec.get("index_ttl", 3600),
                     access_log=os.path.join(run_dir, "apt-access.log")).start()
    targets = {"apt": proxy.port}
    targets.update(spec.get("targets", {}))
    relays = []
    try:
        for item in spec["listeners"]:
            target = targets[item["target"]]
            sock = listen(item["address"], item["port"], item.get("netns"))
            relays.append(Relay(sock, target, name=f"relay-{item['target']}-{item['address']}").start())
    except Exception as exc:  # pylint: disable=broad-exception-caught
        with open(os.path.join(run_dir, "services.failed"), "w", encoding="utf-8") as handle:
            handle.write(f"{type(exc).__name__}: {exc}\n")
        proxy.stop()
        return 1
    ready = {"pid": os.getpid(), "apt_proxy_url": proxy.url, "listeners": spec["listeners"]}
    temp = os.path.join(run_dir, ".services.ready")
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(ready, handle)
    os.replace(temp, os.path.join(run_dir, "services.ready"))

    owner = spec.get("owner") or {}
    watch = owner.get("command") in runstate.SELF_DESTROYING_COMMANDS
    while not stop.wait(2.0):
        if watch and not runstate.alive(owner):
            # The molecule job that owned this run is gone: nobody will destroy it.
            with open(os.path.join(run_dir, "watchdog.log"), "a", encoding="utf-8") as log:
                log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} owner {owner['pid']} gone, destroying\n")
                subprocess.Popen(  # pylint: disable=consider-using-with
                    [sys.executable, "-m", "lab.hosts", "destroy", "--run-id", spec["run_id"], "--reason",
                     "owner gone"], stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                    cwd=spec["repo_root"])
            watch = False
    for relay in relays:
        relay.stop()
    proxy.stop()
    with open(os.path.join(run_dir, "apt-stats.json"), "w", encoding="utf-8") as handle:
        json.dump(proxy.stats, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())

# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The whole revocation-in-seconds loop on real parts, for the integration test and the benchmark.

    DeleteObject on the key bucket (moto S3, behind the project's endpoint)
      -> moto's own S3 event notification to an SQS queue (set up by fleetkeeper.aws.s3_key_notifications)
      -> ansible-rulebook 1.3.2 running the rulebook fleetkeeper.aws.keysync (source fleetkeeper.aws.s3_key_events)
      -> run_playbook fleetkeeper.aws.keysync_now over SSH on every test host of the bucket
      -> each host's fleetkeeper-keysync.service (installed by the bastion_keys role) locks the user,
         removes the key and ends the user's processes.

:class:`KeyEventsLab` boots the test hosts (systemd-nspawn, lab/hosts) with the AWS endpoint relayed into
their network, converges the role on them, puts the notification in place and starts ansible-rulebook.
:meth:`KeyEventsLab.revoke` opens a logged-in SSH session (a login shell on a pty) for a user on every host,
with a detached background loop beside it, deletes the user's key file and measures per host the time from
DeleteObject until the session has ended, no process of the user is left and a login with the key is refused.
An inventory host with no machine behind it (``unreachable``) stands for a host that is down.

Needs root (namespaces), systemd-nspawn, the Debian 12 image, ansible-rulebook and a Java 17 runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import yaml

from lab.hosts import launcher, teardown
from lab.hosts import state as runstate
from lab.ansiblerun import BIN_DIR, REPO_ROOT, ansible_env, run_module
from lab.awsemu import TEST_CREDENTIALS, AwsEmulator

RULEBOOK = os.path.join(BIN_DIR, "ansible-rulebook")
BUCKET = "fleetkeeper-keyevents"
PREFIX = "keys/"
QUEUE = "fleetkeeper-keys"
GROUP = "bastion"


def requirements_missing() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0 or not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"):
        return "needs root, systemd-nspawn and debootstrap (test hosts)"
    if not os.path.exists(RULEBOOK):
        return "ansible-rulebook is not installed in this venv"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "ansible-rulebook needs a Java 17 runtime (openjdk-17-jre-headless)"
    return None


CONVERGE = """\
- name: Converge the bastion_keys role on the lab's hosts
  hosts: {group}:!unreachable
  become: true
  gather_facts: true
  roles:
    - role: fleetkeeper.aws.bastion_keys
      vars:
        bastion_keys_region: us-east-1
        bastion_keys_endpoint_url: "{{{{ lab_aws_endpoint_url_from_host }}}}"
        bastion_keys_sync_environment:
          AWS_ACCESS_KEY_ID: {access_key}
          AWS_SECRET_ACCESS_KEY: {secret_key}
        bastion_keys_admin_groups: [root, sudo]
        bastion_keys_sshd_permit_root_login: prohibit-password
"""


class KeyEventsLab:  # pylint: disable=too-many-instance-attributes
    """Test hosts with the key sync, the key-event queue and a running ansible-rulebook."""

    def __init__(self, workdir: str, hosts: int = 3, users=("alice",), unreachable: bool = True,
                 coalesce_seconds: float = 2.0, emulator_cpus=None, log=print):
        self.workdir = workdir
        self.host_names = [f"keys{n + 1}" for n in range(hosts)]
        self.users = list(users)
        self.with_unreachable = unreachable
        self.coalesce = coalesce_seconds
        self.log = log
        self.emulator_cpus = emulator_cpus
        self.aws = None
        self.rulebook = None
        self.ephemeral = os.path.join(workdir, "hosts")
        self.inventory = os.path.join(workdir, "inventory.yml")
        self.rulebook_log = os.path.join(workdir, "ansible-rulebook.log")
        self.timings = {}
        self.hostvars = {}
        self.sessions = []
        self._created = False

    # ----------------------------------------------------------------- set-up
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        started = time.monotonic()
        if self.emulator_cpus and hasattr(os, "sched_setaffinity"):
            # moto and the proxy (children and threads started now) on these CPUs; everything later on all.
            every = os.sched_getaffinity(0)
            os.sched_setaffinity(0, set(self.emulator_cpus))
            try:
                self.aws = AwsEmulator().start()
            finally:
                os.sched_setaffinity(0, every)
        else:
            self.aws = AwsEmulator().start()
        os.makedirs(os.path.join(self.ephemeral, "inventory"), exist_ok=True)
        owner = {**(runstate.process_identity(os.getpid()) or {}), "command": "test"}
        mark = time.monotonic()
        platforms = [{"name": name, "networks": [{"name": "public"}]} for name in self.host_names]
        self._created = True
        variables = launcher.create(platforms, self.ephemeral, None, "keyevents", aws_endpoint=self.aws.endpoint_url,
                                    owner=owner, log=self.log)
        self.timings["hosts_s"] = round(time.monotonic() - mark, 1)
        self._write_inventory(variables)
        self._seed()
        mark = time.monotonic()
        self._converge()
        self.timings["converge_s"] = round(time.monotonic() - mark, 1)
        self._notifications()
        mark = time.monotonic()
        self._start_rulebook()
        self.timings["rulebook_ready_s"] = round(time.monotonic() - mark, 1)
        self.timings["setup_s"] = round(time.monotonic() - started, 1)

    def _write_inventory(self, variables: dict) -> None:
        with open(os.path.join(self.ephemeral, "inventory", "testhosts_inventory.yml"), encoding="utf-8") as handle:
            connection = yaml.safe_load(handle)["all"]["hosts"]
        hosts = {}
        for name in self.host_names:
            hosts[name] = dict(connection[name],
                               lab_aws_endpoint_url_from_host=variables["testhosts_hosts"][name]["aws_endpoint_url"])
        self.key = variables["testhosts_ssh_key"]
        self.known_hosts = variables["testhosts_ssh_known_hosts"]
        self.addresses = {name: variables["testhosts_addresses"][name]["public"] for name in self.host_names}
        groups = {GROUP: {"hosts": {name: None for name in hosts}}}
        if self.with_unreachable:
            # An address on the hosts' network with no machine behind it: a host that is down.
            public = variables["testhosts_networks"]["public"]
            base = public["subnet"].split("/")[0].rsplit(".", 1)[0]
            hosts["down"] = dict(connection[self.host_names[0]], ansible_host=f"{base}.200")
            groups[GROUP]["hosts"]["down"] = None
            groups["unreachable"] = {"hosts": {"down": None}}
        self.hostvars = hosts
        inventory = {"all": {"hosts": hosts, "children": groups,
                             "vars": {"bastion_keys_bucket": BUCKET, "bastion_keys_prefix": PREFIX}}}
        with open(self.inventory, "w", encoding="utf-8") as handle:
            yaml.safe_dump(inventory, handle)

    def user_key(self, user: str) -> str:
        return os.path.join(self.workdir, "users", user)

    def _seed(self) -> None:
        os.makedirs(os.path.join(self.workdir, "users"), exist_ok=True)
        s3 = self.aws.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        for user in self.users:
            path = self.user_key(user)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{user}@keyevents", "-f", path],
                           check=True)
            with open(path + ".pub", "rb") as handle:
                s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}{user}.pub", Body=handle.read())

    def playbook_env(self, extra=None) -> dict:
        env = ansible_env({"ANSIBLE_PIPELINING": "True", "ANSIBLE_FORKS": "10", **(extra or {})})
        env.pop("ANSIBLE_STDOUT_CALLBACK")
        return env

    def _converge(self) -> None:
        playbook = os.path.join(self.workdir, "converge.yml")
        with open(playbook, "w", encoding="utf-8") as handle:
            handle.write(CONVERGE.format(group=GROUP, access_key=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                         secret_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]))
        proc = subprocess.run([os.path.join(BIN_DIR, "ansible-playbook"), "-i", self.inventory, playbook],
                              env=self.playbook_env(), capture_output=True, text=True, check=False, cwd=self.workdir)
        if proc.returncode != 0:
            raise RuntimeError(f"converge failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")

    def _notifications(self) -> None:
        result = run_module("fleetkeeper.aws.s3_key_notifications", {
            "endpoint_url": self.aws.endpoint_url, "region": "us-east-1", "bucket": BUCKET, "prefix": PREFIX,
            "queue_name": QUEUE, "source_account": "123456789012"}, env=self.aws.env())
        if result.failed or not result.changed:
            raise RuntimeError(f"s3_key_notifications: {result.result}")
        self.queue_url = result["queue_url"]

    def _start_rulebook(self, timeout: float = 240.0) -> None:
        variables = os.path.join(self.workdir, "keysync-vars.json")
        with open(variables, "w", encoding="utf-8") as handle:
            json.dump({"fleetkeeper_keysync_queue_url": self.queue_url, "fleetkeeper_keysync_region": "us-east-1",
                       "fleetkeeper_keysync_endpoint_url": self.aws.endpoint_url,
                       "fleetkeeper_keysync_coalesce_seconds": self.coalesce}, handle)
        env = self.playbook_env(self.aws.env())
        with open(self.rulebook_log, "wb") as log:
            self.rulebook = subprocess.Popen(  # pylint: disable=consider-using-with
                [RULEBOOK, "-r", "fleetkeeper.aws.keysync", "-i", self.inventory, "--vars", variables, "-v"],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # Ready when the source has read S3's test event (sent when the notification was saved) off the queue.
        self.wait_for_log("deleted test event", timeout)

    def rulebook_text(self) -> str:
        with open(self.rulebook_log, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait_for_log(self, text: str, timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.rulebook_text().count(text) < count:
            if self.rulebook.poll() is not None:
                raise RuntimeError(f"ansible-rulebook exited ({self.rulebook.returncode}):\n{self.rulebook_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{text!r} not in ansible-rulebook's log within {timeout:.0f} s:\n"
                                   f"{self.rulebook_text()[-4000:]}")
            time.sleep(0.2)

    # ------------------------------------------------------------- sessions
    def _ssh(self, user: str, key: str, host: str) -> list:
        return ["ssh", "-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", f"{user}@{self.addresses[host]}"]

    def as_root(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self._ssh("root", self.key, host) + [command], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def user_processes(self, host: str, user: str) -> int:
        result = self.as_root(host, f"pgrep -c -u {user} || true")
        if result.returncode != 0:
            raise RuntimeError(f"{host}: pgrep failed: {result.stderr}")
        return int(result.stdout.strip() or 0)

    def key_refused(self, host: str, user: str) -> bool:
        """True when sshd refuses the user's key; False when the login worked."""
        result = subprocess.run(self._ssh(user, self.user_key(user), host) + ["true"], capture_output=True,
                                text=True, timeout=30, check=False)
        if result.returncode == 0:
            return False
        if "Permission denied" in result.stderr:
            return True
        raise RuntimeError(f"{host}: login as {user} neither worked nor was refused: {result.stderr}")

    def open_session(self, host: str, user: str) -> subprocess.Popen:
        """A login shell on a pty, kept open by its stdin, with a detached respawning loop beside it."""
        session = subprocess.Popen(  # pylint: disable=consider-using-with
            ["ssh", "-tt", *self._ssh(user, self.user_key(user), host)[1:]], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.sessions.append(session)
        session.stdin.write(b"setsid sh -c 'while :; do sleep 2 & wait; done' </dev/null >/dev/null 2>&1 &\n")
        session.stdin.flush()
        return session

    def open_sessions(self, user: str, timeout: float = 60) -> dict:
        sessions = {host: self.open_session(host, user) for host in self.host_names}
        deadline = time.monotonic() + timeout
        for host in self.host_names:
            while self.user_processes(host, user) < 3:  # sshd's session process, the shell, the loop
                if sessions[host].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{host}: {user}'s session did not start")
                time.sleep(0.3)
        return sessions

    # ------------------------------------------------------------ revocation
    def revoke(self, user: str, timeout: float = 120) -> dict:
        """Delete the user's key file; per host, seconds until the session ended, nothing of the user runs and
        the key is refused (each measured from DeleteObject)."""
        sessions = self.open_sessions(user)
        runs_before = self.rulebook_text().count("PLAY RECAP")
        results = {}
        threads = []
        start = {}

        def watch(host):
            try:
                measure(host)
            except (RuntimeError, subprocess.SubprocessError) as exc:
                results[host] = {"error": str(exc)}

        def measure(host):
            session = sessions[host]
            try:
                session.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                results[host] = {"error": f"session still open after {timeout} s"}
                return
            ended = time.monotonic() - start["t"]
            while self.user_processes(host, user):
                if time.monotonic() - start["t"] > timeout:
                    results[host] = {"error": "processes left"}
                    return
                time.sleep(0.2)
            gone = time.monotonic() - start["t"]
            while not self.key_refused(host, user):
                if time.monotonic() - start["t"] > timeout:
                    results[host] = {"error": "key still accepted"}
                    return
                time.sleep(0.2)
            refused = time.monotonic() - start["t"]
            results[host] = {"session_ended_s": round(ended, 2), "processes_gone_s": round(gone, 2),
                             "key_refused_s": round(refused, 2), "revoked_s": round(max(ended, gone, refused), 2)}

        s3 = self.aws.client("s3")
        start["t"] = time.monotonic()
        s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}{user}.pub")
        for host in self.host_names:
            thread = threading.Thread(target=watch, args=(host,), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(timeout + 60)
        # The playbook run ends after the last reachable host (and the unreachable one's timeout).
        self.wait_for_log("PLAY RECAP", 180, count=runs_before + 1)
        return results

    def timer_active(self, host: str) -> bool:
        return self.as_root(host, "systemctl is-active fleetkeeper-keysync.timer").stdout.strip() == "active"

    def hold_timer(self, host: str, held: bool) -> None:
        """Stop (``held``) or start the host's sync timer: a test that counts event-driven sync runs holds it, so
        the timer's own randomized runs cannot land among the runs it counts."""
        result = self.as_root(host, f"systemctl {'stop' if held else 'start'} fleetkeeper-keysync.timer")
        if result.returncode != 0:
            raise RuntimeError(f"{host}: could not {'stop' if held else 'start'} the timer: {result.stderr}")

    def sync_runs(self, host: str) -> int:
        """How many times the sync service has been started on the host (systemd's own journal lines)."""
        return sum(line.startswith("Starting ") for line in self.journal(host).splitlines())

    def journal(self, host: str) -> str:
        return self.as_root(host, "journalctl -u fleetkeeper-keysync.service --no-pager -o cat").stdout

    # --------------------------------------------------------------- tear-down
    def stop(self) -> None:
        for session in self.sessions:
            if session.poll() is None:
                os.killpg(session.pid, signal.SIGTERM)
                try:
                    session.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(session.pid, signal.SIGKILL)
                    session.wait()
        if self.rulebook is not None and self.rulebook.poll() is None:
            os.killpg(self.rulebook.pid, signal.SIGINT)
            try:
                self.rulebook.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.rulebook.pid, signal.SIGKILL)
                self.rulebook.wait()
        if self._created:
            teardown.destroy(self.ephemeral)
            self._created = False
        if self.aws is not None:
            self.aws.stop()
            self.aws = None


__all__ = ["KeyEventsLab", "requirements_missing", "BUCKET", "PREFIX", "QUEUE", "REPO_ROOT"]

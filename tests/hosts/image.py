# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Debian 12 root file system every test host boots from.

Built once with debootstrap and cached under ``<cache>/images/<recipe hash>/``;
a change to :data:`RECIPE` or :data:`POST_BUILD` changes the hash, so the next
run builds a new image (old ones stay until ``python -m tests.hosts prune-images``).
Concurrent builders serialise on a lock file, build into a temporary directory
and rename it into place, so a reader never sees a half-built image.

debootstrap downloads through the harness's caching apt proxy, so a rebuild
after a recipe change costs little network.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time

from tests.hosts import paths

RECIPE = {
    "suite": "bookworm",
    "mirror": "http://deb.debian.org/debian",
    "variant": "minbase",
    "include": ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "iproute2", "sudo"],
    "arch": "amd64",
}

# Run with chroot inside the fresh root file system. Keep it to what every test
# host needs and nothing a role installs.
POST_BUILD = r"""
set -eu
# Per-host ssh host keys are made at launch; none are baked in.
rm -f /etc/ssh/ssh_host_*
# A machine id per boot (nspawn makes a transient one when the file is empty).
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
# Timers that would take apt's lock or touch disks in the middle of a test.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
            fstrim.timer systemd-timesyncd.service; do
  ln -sf /dev/null "/etc/systemd/system/$unit"
done
cat > /etc/apt/sources.list <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
# Fewer, smaller downloads; no documentation the tests never read.
cat > /etc/apt/apt.conf.d/90fleetkeeper-testhost <<'EOF'
APT::Install-Recommends "false";
Acquire::Languages "none";
EOF
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/*.log /var/log/apt/* /tmp/* /var/tmp/*
"""


def recipe_hash() -> str:
    text = json.dumps({"recipe": RECIPE, "post": POST_BUILD}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_dir(cache: str | None = None) -> str:
    return os.path.join(paths.images_dir(cache), recipe_hash())


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".fleetkeeper-image.json"))


def _dir_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _unmount_below(path: str) -> None:
    """Unmount anything debootstrap left mounted inside ``path`` (after a failed build)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        points = [line.split()[4] for line in handle]
    for point in sorted((p for p in points if p == real or p.startswith(real + "/")), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def _remove_stale_temp_dirs(images: str, log) -> None:
    for name in os.listdir(images):
        if not name.startswith(".tmp-"):
            continue
        try:
            pid = int(name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not os.path.exists(f"/proc/{pid}"):
            log(f"removing a half-built image left by builder {pid}: {name}")
            _unmount_below(os.path.join(images, name))
            shutil.rmtree(os.path.join(images, name), ignore_errors=True)


def ensure_image(cache: str | None = None, proxy_url: str | None = None, log=print) -> str:
    """Return the path of a complete image for the current recipe, building it if needed."""
    images = paths.images_dir(cache)
    os.makedirs(images, exist_ok=True)
    target = image_dir(cache)
    if is_complete(target):
        return target
    digest = recipe_hash()
    with open(os.path.join(images, f".{digest}.lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target):  # another builder finished while we waited
            return target
        _remove_stale_temp_dirs(images, log)
        if os.path.exists(target):  # incomplete leftover under the final name: not trusted
            shutil.rmtree(target)
        temp = os.path.join(images, f".tmp-{digest}-{os.getpid()}")
        started = time.monotonic()
        log(f"building test host image {digest} (debootstrap {RECIPE['suite']}, a few minutes)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        if proxy_url:
            env["http_proxy"] = proxy_url
        try:
            subprocess.run(
                ["debootstrap", f"--variant={RECIPE['variant']}", f"--arch={RECIPE['arch']}",
                 f"--include={','.join(RECIPE['include'])}", RECIPE["suite"], temp, RECIPE["mirror"]],
                check=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            subprocess.run(["chroot", temp, "/bin/sh", "-c", POST_BUILD], check=True, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            _unmount_below(temp)
            info = {"recipe": RECIPE, "hash": digest, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.monotonic() - started, 1), "size_bytes": _dir_size(temp)}
            with open(os.path.join(temp, ".fleetkeeper-image.json"), "w", encoding="utf-8") as handle:
                json.dump(info, handle, indent=2)
            os.rename(temp, target)
        except subprocess.CalledProcessError as exc:
            _unmount_below(temp)
            shutil.rmtree(temp, ignore_errors=True)
            tail = "\n".join((exc.stdout or "").splitlines()[-20:])
            raise RuntimeError(f"building the test host image failed ({exc.cmd[0]} exited {exc.returncode}); "
                               f"last output:\n{tail}") from None
        except BaseException:
            _unmount_below(temp)
            shutil.rmtree(temp, ignore_errors=True)
            raise
        log(f"image {digest} built in {info['build_seconds']}s, {info['size_bytes'] / 1e6:.0f} MB")
    return target


def image_info(path: str) -> dict:
    with open(os.path.join(path, ".fleetkeeper-image.json"), encoding="utf-8") as handle:
        return json.load(handle)


def prune_images(cache: str | None = None, keep: str | None = None, log=print) -> list:
    """Remove images of older recipes that no live run uses (see ``teardown.images_in_use``)."""
    from tests.hosts.teardown import images_in_use  # pylint: disable=import-outside-toplevel

    images = paths.images_dir(cache)
    keep = keep or recipe_hash()
    used = images_in_use(cache)
    removed = []
    for name in sorted(os.listdir(images)) if os.path.isdir(images) else []:
        path = os.path.join(images, name)
        if name.startswith(".") or name == keep or path in used or not os.path.isdir(path):
            continue
        log(f"removing image {name}")
        shutil.rmtree(path)
        removed.append(name)
    return removed

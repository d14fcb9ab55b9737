# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Debian root file systems test hosts boot from: Debian 12 (bookworm, the
default) or Debian 13 (trixie), chosen per host by its platform's ``release``.

Each release is built once with debootstrap and cached under
``<cache>/images/<recipe hash>/``; a change to a release's recipe (:func:`recipe`)
or post-build script (:func:`post_build`) changes the hash, so the next run
builds a new image (old ones stay until ``python -m lab.hosts prune-images``).
The bookworm recipe and script are exactly what they were before releases
existed, so its hash (and every image already cached) stays valid.
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

from lab.hosts import paths

DEFAULT_RELEASE = "bookworm"
RELEASES = ("bookworm", "trixie")

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
# Timers that would take apt's lock or touch disks in the middle of a test, and the ask-password
# .path units (no console to ask on; each holds one of root's shared inotify instances,
# launcher.INOTIFY_PER_HOST).
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
            fstrim.timer systemd-timesyncd.service \
            systemd-ask-password-wall.path systemd-ask-password-console.path; do
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


def check_release(release: str) -> str:
    if release not in RELEASES:
        raise ValueError(f"release {release!r} is not one of {', '.join(RELEASES)}")
    return release


def recipe(release: str = DEFAULT_RELEASE) -> dict:
    """debootstrap's arguments for ``release`` (the bookworm dict is :data:`RECIPE` itself)."""
    return dict(RECIPE, suite=check_release(release))


def post_build(release: str = DEFAULT_RELEASE) -> str:
    """The post-build script for ``release``: :data:`POST_BUILD` with its suites renamed."""
    return POST_BUILD.replace(DEFAULT_RELEASE, check_release(release))


def recipe_hash(release: str = DEFAULT_RELEASE) -> str:
    text = json.dumps({"recipe": recipe(release), "post": post_build(release)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_dir(cache: str | None = None, release: str = DEFAULT_RELEASE) -> str:
    return os.path.join(paths.images_dir(cache), recipe_hash(release))


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


def ensure_image(cache: str | None = None, proxy_url: str | None = None, log=print,
                 release: str = DEFAULT_RELEASE) -> str:
    """Return the path of a complete image of ``release``'s current recipe, building it if needed."""
    images = paths.images_dir(cache)
    os.makedirs(images, exist_ok=True)
    target = image_dir(cache, release)
    if is_complete(target):
        return target
    digest = recipe_hash(release)
    build = recipe(release)
    with open(os.path.join(images, f".{digest}.lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target):  # another builder finished while we waited
            return target
        _remove_stale_temp_dirs(images, log)
        if os.path.exists(target):  # incomplete leftover under the final name: not trusted
            shutil.rmtree(target)
        temp = os.path.join(images, f".tmp-{digest}-{os.getpid()}")
        started = time.monotonic()
        log(f"building test host image {digest} (debootstrap {build['suite']}, a few minutes)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        if proxy_url:
            env["http_proxy"] = proxy_url
        try:
            subprocess.run(
                ["debootstrap", f"--variant={build['variant']}", f"--arch={build['arch']}",
                 f"--include={','.join(build['include'])}", build["suite"], temp, build["mirror"]],
                check=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            subprocess.run(["chroot", temp, "/bin/sh", "-c", post_build(release)], check=True, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            _unmount_below(temp)
            info = {"recipe": build, "hash": digest, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
    """Remove images of older recipes that no live run uses (see ``teardown.images_in_use``);
    the current recipe of every release is kept."""
    from lab.hosts.teardown import images_in_use  # pylint: disable=import-outside-toplevel

    images = paths.images_dir(cache)
    keep = {keep} if keep else {recipe_hash(r) for r in RELEASES}
    used = images_in_use(cache)
    removed = []
    for name in sorted(os.listdir(images)) if os.path.isdir(images) else []:
        path = os.path.join(images, name)
        if name.startswith(".") or name in keep or path in used or not os.path.isdir(path):
            continue
        log(f"removing image {name}")
        shutil.rmtree(path)
        removed.append(name)
    return removed

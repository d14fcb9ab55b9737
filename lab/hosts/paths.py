# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where the harness keeps things: everything under one cache directory
(``$FK_CACHE``, default /var/cache/fleetkeeper), outside the repository."""

from __future__ import annotations

import os

DEFAULT_CACHE = "/var/cache/fleetkeeper"


def cache_dir(cache: str | None = None) -> str:
    return cache or os.environ.get("FK_CACHE") or DEFAULT_CACHE


def images_dir(cache: str | None = None) -> str:
    return os.path.join(cache_dir(cache), "images")


def apt_cache_dir(cache: str | None = None) -> str:
    return os.path.join(cache_dir(cache), "apt")


def runs_dir(cache: str | None = None) -> str:
    return os.path.join(cache_dir(cache), "runs")


def run_dir(run_id: str, cache: str | None = None) -> str:
    return os.path.join(runs_dir(cache), run_id)

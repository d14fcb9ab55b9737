# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures shared by every test: the embedded AWS endpoint and the Ansible runner."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from lab.awsemu import AwsEmulator

# No per-example time limit for property tests: the stages share two cores, and a slow example is not a failure.
settings.register_profile("fleetkeeper", deadline=None)
settings.load_profile("fleetkeeper")


@pytest.fixture(scope="session")
def aws_emulator():
    """moto in server mode plus the fault proxy, for the whole session."""
    emulator = AwsEmulator().start()
    yield emulator
    emulator.stop()


@pytest.fixture
def aws(aws_emulator, monkeypatch):
    """A clean AWS endpoint for one test.

    moto's state, the proxy's faults and its call counts are reset first; the
    standard AWS credential variables are set (never the endpoint: code under
    test must be handed ``aws.endpoint_url``).
    """
    aws_emulator.reset()
    for key, value in aws_emulator.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    yield aws_emulator
    aws_emulator.proxy.reset()


@pytest.fixture(scope="session")
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

"""Every interpreted kernel launch in these tests is bounds-checked: a load or store outside the
tensors the launch was given fails the test (launches.Recorder), whether or not its value would have
reached the output."""

import pytest

from .launches import Recorder


@pytest.fixture(autouse=True)
def bounds_checked(monkeypatch):
    return Recorder(monkeypatch, check_bounds=True)

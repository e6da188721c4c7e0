"""Shared fixtures of the state machine tests."""

from __future__ import annotations

import pytest

from .helpers import Sim  # tests/conftest.py registers its assertion rewrite


@pytest.fixture
def sim() -> Sim:
    """A fresh state machine with the default tariff "T" (VND, 1 đ/s, 1/1)."""
    world = Sim()
    world.put_tariff()
    return world

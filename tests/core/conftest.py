"""Shared fixtures of the state machine tests."""

from __future__ import annotations

import pytest

# helpers.py asserts too; let pytest explain its failures as it does in test modules.
pytest.register_assert_rewrite(f"{__package__}.helpers")

from .helpers import Sim  # noqa: E402 (the rewrite hook must be registered first)


@pytest.fixture
def sim() -> Sim:
    """A fresh state machine with the default tariff "T" (VND, 1 đ/s, 1/1)."""
    world = Sim()
    world.put_tariff()
    return world

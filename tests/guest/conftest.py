"""Fixtures of the guest tests: the guest's kernel and initramfs, built once per session."""

from __future__ import annotations

import pytest

from tests.guest.machine import GuestFiles, build_guest


@pytest.fixture(scope="session")
def guest_files() -> GuestFiles:
    """``tools/guest/build``'s output (cached); a failed build fails the tests using it."""
    return build_guest()

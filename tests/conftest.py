"""Fixtures shared by the test suite: one lab of real systemd hosts per session."""

import os

import pytest

LAB_SUPERNODES = 2


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "lab_lifecycle: stops and restarts the shared lab, so it runs after every other test"
    )


def pytest_collection_modifyitems(config, items):
    # A stable sort keeps the collected order and only moves lifecycle tests
    # to the end, where recreating the lab cannot undo another test's deploy.
    items.sort(key=lambda item: item.get_closest_marker("lab_lifecycle") is not None)


@pytest.fixture(scope="session")
def lab():
    """Return the state of a running lab with one superlink and two supernodes.

    Reuses a healthy lab of that shape if one is up; otherwise starts one and
    stops it when the session ends.
    """
    from melody_lab import lab as melody_lab

    if os.geteuid() != 0:
        pytest.skip("the lab needs root for its bridge, overlay mounts and cgroups")

    state = melody_lab.running_lab(supernodes=LAB_SUPERNODES)
    started_here = state is None
    if started_here:
        state = melody_lab.up(supernodes=LAB_SUPERNODES)
    yield state
    if started_here:
        melody_lab.down()

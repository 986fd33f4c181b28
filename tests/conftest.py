"""Shared fixtures: a tiny open_clip model in local-dir format, image folders, a databases home."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdm.models.tiny import make_tiny_clip
from tests.helpers.imagezoo import write_zoo
from tests.helpers.world import SHARED_MISSING, make_folder


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models gain nothing from a second, and lose a lot when processes share 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Model id ('local-dir:PATH') of a random tiny open_clip model."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """(folder, good relative paths, {bad relative path: reason})."""
    root = tmp_path_factory.mktemp("zoo")
    good, bad = write_zoo(root)
    return root, good, bad


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty databases home, also set as $RDM_INDEXES."""
    h = tmp_path / "indexes"
    monkeypatch.setenv("RDM_INDEXES", str(h))
    return h


@pytest.fixture
def pictures(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "pictures"
    return root, make_folder(root, 24)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Only parity tests (@pytest.mark.parity) may skip for want of ../shared: any other test is a behaviour test and
    makes its own tiny models, so such a skip is turned into a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and SHARED_MISSING in str(report.longrepr) and item.get_closest_marker("parity") is None:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} needs ../shared but is not marked parity: {report.longrepr}"

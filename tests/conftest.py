"""Shared fixtures: the real data folder (``PARTDISTILL_DATA_ROOT`` or ``../shared/data``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from gen3d.readers import default_data_root


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_root()
    if not (root / "README.md").exists():
        pytest.fail(f"real data not found at {root}: set PARTDISTILL_DATA_ROOT to the shared data folder")
    return root


@pytest.fixture(scope="session")
def labeled_psb_archive(data_root) -> Path:
    return data_root / "psb_labeled_kalogerakis2010" / "LabeledDB_new.tar.xz"


@pytest.fixture(scope="session")
def labeled_psb_files(labeled_psb_archive):
    """All 380 Labeled-PSB (mesh, labels) pairs, read once from the archive."""
    from gen3d.readers.psb import iter_labeled_psb_files

    return list(iter_labeled_psb_files(labeled_psb_archive))

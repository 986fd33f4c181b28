"""The package follows its data flow: the import-linter contracts hold, they catch a lower layer importing a higher
one, and the old flat import paths still give the moved modules."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.helpers.world import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": str(LINT.parent)})


def test_the_layers_and_acyclic_contracts_hold():
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("db/store.py", "from ..sampling import pipeline", "rdm.db is not allowed to import rdm.sampling"),
    ("db/compaction.py", "from .database import Database", "No cycles are allowed in rdm.db"),
])
def test_the_contracts_catch_a_violation(tmp_path, module, line, broken):
    """A copy of the package with one upward (or circular) import fails the check, naming it."""
    shutil.copytree(REPO / "rdm", tmp_path / "rdm", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    target = tmp_path / "rdm" / module
    target.write_text(target.read_text() + f"\n{line}  # a deliberate violation\n")
    out = lint(tmp_path)
    assert out.returncode != 0
    assert broken in out.stdout, out.stdout


def test_old_import_paths_give_the_moved_modules():
    import rdm.db.database
    import rdm.sampling.pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import rdm.database as old_database
        from rdm.pipeline import RDMPipeline
    assert old_database is rdm.db.database
    assert RDMPipeline is rdm.sampling.pipeline.RDMPipeline
    assert any("moved to rdm.db.database" in str(w.message) for w in caught)

"""The notebooks execute (nbclient), with tiny stand-ins injected into their parameters cell."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers.world import REPO

NOTEBOOKS = REPO / "notebooks"


def run_notebook(name: str, params: dict, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_outputs_are_stripped_in_git():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"), path


def test_catalog_walkthrough_runs_from_build_index_to_comparison(tmp_path, tiny_clip):
    from rdm.embed import load_embedder
    from rdm.models.tiny import make_tiny_rdm

    model = make_tiny_rdm(tmp_path / "model", load_embedder(tiny_clip).identity.to_dict(), resolution=64, k=4,
                          vae_factor=16)
    out = tmp_path / "walk"
    run_notebook("catalog_walkthrough.ipynb", {"CLIP": tiny_clip, "MODEL": str(model), "OUT": str(out), "STEPS": 2},
                 tmp_path)
    assert (out / "indexes" / "flat" / "manifest.json").is_file() and (out / "indexes" / "neon" / "manifest.json").is_file()
    assert (out / "search_sheet.png").is_file()
    assert len(list(out.glob("compare*.png"))) == 1 and len(list(out.glob("compare*.json"))) == 1


def test_style_comparison_runs_with_the_bundled_demo_model(tmp_path):
    from rdm.demo.run import DEMO_MODEL
    from rdm.demo.toyart import STYLES

    if not (DEMO_MODEL / "rdm_config.json").is_file():
        pytest.fail(f"the demo model is not bundled in {DEMO_MODEL} (scripts/train_demo.sh makes it)")
    out = tmp_path / "styles"
    nb = run_notebook("style_comparison.ipynb", {"OUT": str(out), "SEEDS": 1, "STEPS": 2, "N_PER_STYLE": 8,
                                                 "SWEEP_PROMPTS": ("a purple cross",)}, tmp_path)
    for style in STYLES:
        assert (out / "indexes" / style / "manifest.json").is_file()
    for name in ("demo-grid.png", "demo-grid.json", "neighbours.png", "style_swap_chart.png",
                 "style_scale_sweep.png", "restyle_strip.png", "restyle_sweep.png"):
        assert (out / name).is_file(), name
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "style-swap accuracy" in printed and "judge held-out accuracy" in printed
    assert "restyled 'a " in printed and "restyle sweep (measured): S=0.3" in printed
    sweep = printed[printed.index("style scale sweep"):].splitlines()[2:7]  # one row per s_nn of the sweep
    assert [float(row.split()[0]) for row in sweep] == [0.0, 0.5, 1.0, 2.0, 4.0]

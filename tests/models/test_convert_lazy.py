"""Conversion reads a checkpoint lazily: storages are mapped from the file, untouched ones cost nothing."""

import subprocess
import sys
import zipfile

import pytest
import torch

from rdm.models.convert.compvis import compvis_layout, read_compvis_config
from rdm.models.convert.safe_load import load_checkpoint
from tests.helpers.world import GOLDEN, need

RSS_PROBE = r"""
import sys
import torch
from rdm.models.convert.safe_load import load_checkpoint

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

before = rss()
ckpt = load_checkpoint(sys.argv[1])
small = ckpt["state_dict"]["model.diffusion_model.out.2.weight"].sum().item()  # used: read from the map
print(rss() - before)
"""


@pytest.fixture(scope="module")
def golden_state():
    return load_checkpoint(need(GOLDEN / "model.ckpt"))["state_dict"]


@pytest.mark.parity
def test_layout_of_a_config_is_the_golden_checkpoints(golden_state):
    layout = compvis_layout(read_compvis_config(GOLDEN / "config.yaml"))
    assert layout == {k: (tuple(v.shape), v.dtype) for k, v in golden_state.items()}


@pytest.mark.parity
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_tensors_are_views_of_the_mapped_checkpoint(golden_state):
    ckpt = str(need(GOLDEN / "model.ckpt").resolve())
    spans = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == ckpt:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi))
    assert spans, "the checkpoint is not memory-mapped"
    weight = golden_state["model_ema.diffusion_modeltime_embed0weight"]
    assert any(lo <= weight.data_ptr() < hi for lo, hi in spans)


@pytest.mark.parity
def test_a_compressed_checkpoint_is_read_into_memory_instead(golden_state, tmp_path):
    packed = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(need(GOLDEN / "model.ckpt")) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    state = load_checkpoint(packed)["state_dict"]
    assert state.keys() == golden_state.keys()
    assert all(torch.equal(state[k], golden_state[k]) for k in golden_state)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_storages_never_used_cost_no_memory(tmp_path):
    """256 MB of optimizer state in the checkpoint: loading it and using a weight adds far less than that."""
    state = {"model.diffusion_model.out.2.weight": torch.ones(16, 32, 3, 3)}
    torch.save({"state_dict": state, "optimizer_states": [{"exp_avg": torch.ones(64 * 2**20)}]},
               tmp_path / "big.ckpt")
    grown = int(subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "big.ckpt")], check=True,
                               capture_output=True, text=True).stdout.split()[-1])
    assert grown < 32 * 2**20, f"loading grew the resident memory by {grown / 2**20:.0f} MiB"

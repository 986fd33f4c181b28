"""Checkpoints are untrusted: tensors load, nothing else in the pickle runs."""

import os
import pickle
import uuid
import zipfile
from pathlib import Path

import pytest
import torch

from rdm.errors import RDMError, UnsafeCheckpoint
from rdm.models.convert.safe_load import load_checkpoint, load_checkpoint_state_dict
from tests.helpers.world import SHARED, need

GOLDEN_CKPT = SHARED / "golden" / "compvis_rdm_small" / "model.ckpt"


class RunsShell:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Bookkeeping:
    """A plain object: pickled as NEWOBJ + BUILD of a class outside the allow-list."""

    def __init__(self):
        self.best = 0.5


class CallbackClass:
    """Stands for Lightning's ModelCheckpoint: stored as a dict key, never called."""


@pytest.fixture
def marker():
    path = Path("/tmp") / f"pwned_{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


def _torch_archive(path: Path, pkl: bytes) -> Path:
    """A zip laid out like torch.save's, holding a hand-written data.pkl."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    return path


def test_pickle_that_runs_a_command_is_refused(tmp_path, marker):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": RunsShell(marker)}, ckpt)
    with pytest.raises(UnsafeCheckpoint, match="system"):
        load_checkpoint_state_dict(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("opcode", ["INST", "BUILD"])
def test_hand_written_calls_are_refused(tmp_path, marker, opcode):
    command = f"touch {marker}".encode()
    pkl = {
        "INST": b"\x80\x02(X" + len(command).to_bytes(4, "little") + command + b"ios\nsystem\n.",  # os.system(cmd)
        "BUILD": b"\x80\x02cos\nsystem\n}b.",  # set the state of os.system
    }[opcode]
    with pytest.raises(UnsafeCheckpoint, match="os.system"):
        load_checkpoint(_torch_archive(tmp_path / "evil.ckpt", pkl))
    assert not marker.exists()


def test_unknown_object_is_refused(tmp_path):
    ckpt = tmp_path / "obj.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Bookkeeping()}, ckpt)
    with pytest.raises(UnsafeCheckpoint, match="Bookkeeping"):
        load_checkpoint(ckpt)


def test_stored_class_reference_is_inert(tmp_path):
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {CallbackClass: {"best_model_path": ""}}}, ckpt)
    obj = load_checkpoint(ckpt)
    (key,) = obj["callbacks"]
    assert key is not CallbackClass and "CallbackClass" in repr(key)
    with pytest.raises(UnsafeCheckpoint, match="CallbackClass"):
        key()


def test_tensors_round_trip(tmp_path):
    base = torch.randn(6, 5)
    tensors = {
        "float": base, "view": base[1:, 2:], "transposed": base.t(), "half": torch.randn(3, 4).half(),
        "long": torch.arange(7), "bool": torch.tensor([True, False]), "empty": torch.empty(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, 2)), "scalar": torch.tensor(3.5),
    }
    ckpt = tmp_path / "plain.pt"
    torch.save({"state_dict": tensors}, ckpt)
    loaded = load_checkpoint_state_dict(ckpt)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t.detach()), name


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(RDMError, match="not a PyTorch checkpoint"):
        load_checkpoint_state_dict(path)


def test_zip_without_pickle_and_legacy_format(tmp_path):
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(RDMError, match="data.pkl"):
        load_checkpoint(tmp_path / "a.zip")
    torch.save({"w": torch.ones(1)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(RDMError, match="legacy"):
        load_checkpoint(tmp_path / "old.pt")
    with pytest.raises(RDMError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parity
def test_golden_lightning_checkpoint_loads():
    need(GOLDEN_CKPT)
    with pytest.raises(pickle.UnpicklingError):  # what a plain weights_only load says about it
        torch.load(GOLDEN_CKPT, weights_only=True)
    state = load_checkpoint_state_dict(GOLDEN_CKPT)
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape == (32, 16, 3, 3)
    assert state["model_ema.diffusion_modelinput_blocks00weight"].shape == (32, 16, 3, 3)
    assert state["first_stage_model.encoder.down.4.attn.0.q.weight"].shape == (64, 64, 1, 1)
    assert state["betas"].shape == (1000,)
    assert all(v.dtype in (torch.float32, torch.int32) for v in state.values())
    assert not torch.equal(state["model.diffusion_model.out.2.weight"], state["model_ema.diffusion_modelout2weight"])
    callbacks = load_checkpoint(GOLDEN_CKPT)["callbacks"]
    assert any("ModelCheckpoint" in repr(key) for key in callbacks)

"""rdm train: tiny real runs on generated pictures, a tiny CLIP and a database built from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from rdm import api
from rdm.cli import main as cli
from rdm.db.database import Database
from rdm.errors import RDMError
from rdm.models.convert.compvis import convert_compvis_checkpoint
from rdm.models.format import RDMConfig, load_model_components, save_model_folder
from rdm.sampling import conditioning as cond
from rdm.sampling.pipeline import RDMPipeline
from rdm.sources import open_source
from rdm.train import TrainConfig, VAETrainConfig, list_presets, load_preset, mine_neighbours, train, train_vae
from rdm.train.data import exclude_self_and_duplicates, prepare_training_data
from rdm.train.loop import batch_indices, make_batch, neighbour_keep, step_generator, training_context
from rdm.train.presets import CONFIG_DIR
from tests.helpers.world import GOLDEN, make_folder, need

DUP_THRESHOLD = 0.999  # the random tiny CLIP puts distinct pictures at 0.93-0.995 cosine; copies at 1.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_clip):
    """8 pictures, a database built from the same folder, a shared training-data cache."""
    root = tmp_path_factory.mktemp("train")
    make_folder(root / "pics", 8)
    api.build_index(str(root / "pics"), name="pics", clip=tiny_clip, indexes=str(root / "indexes"), workers=0,
                    progress=False)
    return {"root": root, "data": str(root / "pics"), "db": "pics", "indexes": str(root / "indexes"),
            "cache": str(root / "cache")}


def write_captions(folder: Path, captions: dict[str, str]) -> None:
    """metadata.jsonl (imagefolder convention) giving some of a folder's images a caption."""
    rows = [json.dumps({"file_name": name, "caption": text}) for name, text in captions.items()]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_clip):
    """8 pictures, 7 of them captioned (img007.png has none), and a database built from them."""
    root = tmp_path_factory.mktemp("captioned")
    names = make_folder(root / "pics", 8)
    captions = {name: f"a picture number {i}" for i, name in enumerate(names[:7])}
    write_captions(root / "pics", captions)
    api.build_index(str(root / "pics"), name="pics", clip=tiny_clip, indexes=str(root / "indexes"), workers=0,
                    progress=False)
    return {"root": root, "data": str(root / "pics"), "db": "pics", "indexes": str(root / "indexes"),
            "cache": str(root / "cache"), "captions": captions, "names": names}


def config(toy, out, **kw) -> TrainConfig:
    base = dict(data=toy["data"], db=toy["db"], indexes=toy["indexes"], out=str(out), preset="tiny",
                cache_dir=toy["cache"], dedup_threshold=DUP_THRESHOLD, progress=False, sample_every=-1)
    return TrainConfig(**{**base, **kw})


# --- the training step's pieces ---------------------------------------------------------------------

def test_masked_padding_equals_the_unpadded_context_the_pipeline_builds():
    """A step that keeps k' < k neighbours (zeroed + masked) sees exactly the (B, 1+k', D) context of
    inference with k = k'; an all-zeros context gives the same output whatever its length."""
    torch.manual_seed(0)
    unet = load_preset("tiny").unet_model(3, 16, 32).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    query, neighbours = torch.randn(2, 32), torch.randn(2, 4, 32)
    keep = neighbour_keep(torch.tensor([4, 4]), 4, torch.Generator().manual_seed(0), random_k=False)
    keep[:, 2:] = False  # k' = 2
    context, mask = training_context(query, neighbours, keep, drop=torch.tensor([False, False]))
    assert context.shape == (2, 5, 32) and mask.tolist() == [[True, True, True, False, False]] * 2
    with torch.no_grad():
        padded = unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        unpadded = unet(x, t, encoder_hidden_states=torch.cat([query[:, None], neighbours[:, :2]], 1)).sample
        zeros5 = unet(x, t, encoder_hidden_states=torch.zeros(2, 5, 32)).sample
        zeros2 = unet(x, t, encoder_hidden_states=torch.zeros(2, 2, 32)).sample
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zeros5, zeros2, atol=1e-6, rtol=1e-6)
    dropped, dmask = training_context(query, neighbours, keep, drop=torch.tensor([True, False]))
    assert dropped[0].abs().sum() == 0 and dmask[0].all() and dropped[1].abs().sum() > 0


def test_random_k_and_data_order_are_pure_functions_of_seed_and_step():
    counts = torch.tensor([4, 2, 0, 4, 4, 4])
    keep = neighbour_keep(counts, 4, step_generator(0, 3, 0, 0), random_k=True)
    assert (keep.sum(1) <= counts).all() and (keep.sum(1)[counts > 0] >= 1).all()
    assert keep.sum(1)[2] == 0  # an image without neighbours keeps only its query token
    again = neighbour_keep(counts, 4, step_generator(0, 3, 0, 0), random_k=True)
    assert torch.equal(keep, again)
    first_epoch = np.concatenate([batch_indices(10, 7, b, 5) for b in range(2)])
    assert sorted(first_epoch) == list(range(10))  # every image once per epoch
    assert not np.array_equal(first_epoch, np.concatenate([batch_indices(10, 7, b, 5) for b in range(2, 4)]))


def test_exclusion_rules_on_plain_arrays():
    scores = np.array([[1.0, 0.97, 0.9, 0.8, 0.7]], np.float32)
    rows = np.array([[0, 1, 2, 3, -1]])
    s, r, n_self, n_dup = exclude_self_and_duplicates(scores, rows, ["a"], ["a", "b", "c", "d"], 2, 0.95)
    assert r.tolist() == [[2, 3]] and n_self.tolist() == [1] and n_dup.tolist() == [1]
    s, r, _, _ = exclude_self_and_duplicates(scores, rows, None, ["a", "b", "c", "d"], 4, 0.95)
    assert r.tolist() == [[2, 3, -1, -1]] and np.isneginf(s[0, 2:]).all()


# --- data -------------------------------------------------------------------------------------------

def test_neighbour_mining_excludes_self_and_a_planted_duplicate(tmp_path, tiny_clip):
    pics = tmp_path / "pics"
    names = make_folder(pics, 8)
    shutil.copy(pics / names[3], pics / "zz_copy_of_3.png")
    api.build_index(str(pics), name="dups", clip=tiny_clip, indexes=str(tmp_path / "idx"), workers=0, progress=False)
    db = Database.open("dups", tmp_path / "idx")
    ids = db.ids
    nb = mine_neighbours(db.vectors, ids, db, k=4, threshold=DUP_THRESHOLD)
    for i, own in enumerate(ids):
        assert own not in nb.ids[i] and len(nb.ids[i]) == 4
    assert "zz_copy_of_3.png" not in nb.ids[ids.index(names[3])]
    assert names[3] not in nb.ids[ids.index("zz_copy_of_3.png")]
    assert nb.excluded_self == 9 and nb.excluded_duplicates == 2
    assert (np.diff(nb.scores, axis=1) <= 0).all()  # nearest first, as at inference

    # Through the cached preparation: same rows, and the second call reuses the cache.
    embedder = api.embedder_for(db)
    data = prepare_training_data(open_source(str(pics)), db, embedder, None, 16, 4, DUP_THRESHOLD,
                                 cache_dir=tmp_path / "cache", progress=False)
    assert data.ids == ids and data.latents.shape == (9, 3, 16, 16) and data.latents.dtype == np.uint8
    assert data.neighbours.excluded_duplicates == 2
    np.testing.assert_allclose(data.neighbour_vectors, db.vectors_at(data.neighbours.rows))
    embedder_calls = []
    original = embedder.encode_image_files
    embedder.encode_image_files = lambda *a, **kw: embedder_calls.append(1) or original(*a, **kw)
    try:
        again = prepare_training_data(open_source(str(pics)), db, embedder, None, 16, 4, DUP_THRESHOLD,
                                      cache_dir=tmp_path / "cache", progress=False)
    finally:
        embedder.encode_image_files = original
    assert embedder_calls == [] and again.cache == data.cache
    np.testing.assert_array_equal(again.neighbours.rows, data.neighbours.rows)


def test_a_large_jpeg_gets_the_same_query_vector_as_in_the_database(tmp_path, tiny_clip):
    from PIL import Image

    pics = tmp_path / "pics"
    make_folder(pics, 4)
    rng = np.random.default_rng(0)
    big = np.repeat(np.repeat(rng.integers(0, 255, (75, 100, 3), dtype=np.uint8), 16, 0), 16, 1)  # 1600x1200
    Image.fromarray(big).save(pics / "big.jpg", quality=90)  # decoded in draft mode by builds and queries
    api.build_index(str(pics), name="big", clip=tiny_clip, indexes=str(tmp_path / "idx"), workers=0, progress=False)
    db = Database.open("big", tmp_path / "idx")
    embedder = api.embedder_for(db)
    data = prepare_training_data(open_source(str(pics)), db, embedder, None, 16, 2, DUP_THRESHOLD,
                                 cache_dir=tmp_path / "cache", progress=False)
    row = db.rows_of(["big.jpg"])["big.jpg"]
    np.testing.assert_allclose(data.query[data.ids.index("big.jpg")], db.vectors[row], atol=1e-6)
    full = embedder.encode_images([Image.open(pics / "big.jpg").convert("RGB")])[0]  # what full-size decoding gives
    assert np.abs(full - db.vectors[row]).max() > 1e-4  # so the test tells the two paths apart


def test_text_queries_are_the_captions_text_embeddings(captioned, tmp_path):
    db = Database.open(captioned["db"], captioned["indexes"])
    embedder = api.embedder_for(db)
    args = (db, embedder, None, 16, 4, DUP_THRESHOLD)
    image = prepare_training_data(open_source(captioned["data"]), *args, cache_dir=tmp_path / "cache", progress=False)
    assert image.text_query is None
    text = prepare_training_data(open_source(captioned["data"]), *args, cache_dir=tmp_path / "cache", progress=False,
                                 query="text")
    assert text.cache == image.cache  # the text queries are added beside query.npy
    names, captions = captioned["names"], captioned["captions"]
    assert text.ids == names and text.has_caption.tolist() == [True] * 7 + [False]
    np.testing.assert_allclose(text.text_query[:7], embedder.encode_text([captions[n] for n in names[:7]]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(text.text_query[7], text.query[7])  # no caption: the image embedding
    # Neighbours are still mined with the image embeddings, so both kinds share them.
    np.testing.assert_array_equal(text.neighbours.rows, image.neighbours.rows)
    assert np.abs((text.text_query * text.query).sum(1)[:7] - 1).min() > 1e-3  # really another vector

    # Cached: a second preparation embeds nothing.
    calls = []
    original = embedder.encode_text
    embedder.encode_text = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        again = prepare_training_data(open_source(captioned["data"]), *args, cache_dir=tmp_path / "cache",
                                      progress=False, query="text")
    finally:
        embedder.encode_text = original
    assert calls == [] and again.cache == text.cache
    np.testing.assert_array_equal(again.text_query, text.text_query)

    # Other captions -> another cache key, and the new captions' embeddings.
    pics = tmp_path / "pics"
    shutil.copytree(captioned["data"], pics)
    changed = dict(captions, **{names[0]: "a completely different caption"})
    write_captions(pics, changed)
    before = prepare_training_data(open_source(captioned["data"]), *args, cache_dir=tmp_path / "c2", progress=False,
                                   query="text")
    after = prepare_training_data(open_source(str(pics)), *args, cache_dir=tmp_path / "c2", progress=False,
                                  query="text")
    assert after.cache != before.cache
    np.testing.assert_allclose(after.text_query[0], embedder.encode_text([changed[names[0]]])[0], rtol=1e-5,
                               atol=1e-6)

    # No caption at all: text queries are refused, not silently replaced by image embeddings.
    make_folder(tmp_path / "bare", 3)
    with pytest.raises(RDMError, match="no training image has a caption"):
        prepare_training_data(open_source(str(tmp_path / "bare")), *args, cache_dir=tmp_path / "cache",
                              progress=False, query="text")


def test_the_batch_uses_the_configured_query(captioned, tmp_path):
    db = Database.open(captioned["db"], captioned["indexes"])
    data = prepare_training_data(open_source(captioned["data"]), db, api.embedder_for(db), None, 16, 4,
                                 DUP_THRESHOLD, cache_dir=captioned["cache"], progress=False, query="text")
    index = np.arange(8)
    batches = {}
    for kind in ("image", "text", "mixed"):
        cfg = config(captioned, tmp_path / kind, query=kind, cond_drop=0.0)
        batches[kind] = make_batch(data, index, step_generator(0, 5, 0, 0), 1.0, cfg, 1000, torch.device("cpu"))
    image_q, text_q = torch.from_numpy(data.query), torch.from_numpy(data.text_query)
    torch.testing.assert_close(batches["image"]["context"][:, 0], image_q)
    torch.testing.assert_close(batches["text"]["context"][:, 0], text_q)
    mixed = batches["mixed"]["context"][:, 0]
    from_text = (mixed == text_q).all(1)
    assert ((mixed == image_q).all(1) | from_text).all()
    assert 0 < from_text[:7].sum() < 7  # both kinds drawn (captioned rows; row 7 has text == image)
    for kind in ("text", "mixed"):  # the query is drawn last: the other draws are those of an image-query run
        for name in ("x0", "noise", "t", "mask"):
            torch.testing.assert_close(batches[kind][name], batches["image"][name])
        torch.testing.assert_close(batches[kind]["context"][:, 1:], batches["image"]["context"][:, 1:])
    again = make_batch(data, index, step_generator(0, 5, 0, 0), 1.0, config(captioned, tmp_path, query="mixed",
                       cond_drop=0.0), 1000, torch.device("cpu"))
    torch.testing.assert_close(again["context"], batches["mixed"]["context"])  # a pure function of the step


# --- training ---------------------------------------------------------------------------------------

def test_train_overfits_and_writes_a_loadable_model(toy, tmp_path):
    result = train(config(toy, tmp_path / "run", steps=60, sample_every=0, sample_steps=4, num_val=2))
    losses = np.array(result.losses)
    assert len(losses) == 60 and np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    unet, vae, scheduler, cfg, null = load_model_components(result.model_dir)
    assert vae is None and null is None and unet.config.cross_attention_dim == 32
    assert (cfg.k, cfg.query_token, cfg.unconditional, cfg.resolution, cfg.latent_channels) == (4, True, "zeros", 16, 3)
    assert cfg.embedder == Database.open(toy["db"], toy["indexes"]).identity.to_dict()
    assert cfg.latent_scale_factor == 1.0 and cfg.prediction_type == "epsilon" and cfg.source["step"] == 60
    sc = scheduler.config  # the CompVis RDM schedule (rdm.models.convert.compvis.scheduler_config_from_compvis)
    assert (sc.beta_start, sc.beta_end, sc.beta_schedule) == (0.0015, 0.015, "scaled_linear")
    assert sc.num_train_timesteps == 1000
    assert (sc.timestep_spacing, sc.steps_offset, sc.set_alpha_to_one) == ("leading", 1, False)
    assert sc.clip_sample and sc.clip_sample_range == 1.0  # pixel space: x0 clipped to the image range
    assert (result.out / "samples" / "step-0000060.png").is_file()
    assert len((result.out / "metrics.jsonl").read_text().splitlines()) == 60

    # The pipeline samples the trained model with any k <= the trained k.
    pipe = RDMPipeline.from_pretrained(result.model_dir)
    pipe.set_progress_bar_config(disable=True)
    for k in (4, 1):
        out = pipe(query_embeds=torch.randn(1, 32), neighbor_embeds=torch.randn(1, k, 32), num_inference_steps=2,
                   seed=0, output_type="np")
        assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()


def _state(run: Path, step: int) -> dict:
    """Raw weights, EMA, optimizer and lr-schedule state of a checkpoint."""
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    ema = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)
    optim = torch.load(ckpt / "optimizer.bin", weights_only=False)
    sched = torch.load(ckpt / "custom_checkpoint_1.pkl", weights_only=False)
    return {"weights": load_file(str(ckpt / "model.safetensors")), "ema": ema, "optim": optim, "sched": sched,
            "exported": load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))}


def test_noise_schedule_from_the_preset_or_chosen_and_kept_or_changed_by_fine_tuning(toy, tmp_path):
    def schedule(run):
        sc = load_model_components(run.model_dir)[2].config
        return sc.beta_schedule, sc.beta_start, sc.beta_end

    assert load_preset("small").train["noise_schedule"] == "ddpm"  # pixel-space demo preset
    ddpm = train(config(toy, tmp_path / "ddpm", steps=2, noise_schedule="ddpm"))
    assert schedule(ddpm) == ("linear", 1e-4, 0.02)
    kept = train(config(toy, tmp_path / "kept", init=str(ddpm.model_dir), steps=1))
    assert schedule(kept) == ("linear", 1e-4, 0.02)
    changed = train(config(toy, tmp_path / "changed", init=str(ddpm.model_dir), steps=1, noise_schedule="ldm"))
    assert schedule(changed) == ("scaled_linear", 0.0015, 0.015)
    with pytest.raises(RDMError, match="noise_schedule must be one of ldm, ddpm"):
        train(config(toy, tmp_path / "bad", steps=1, noise_schedule="cosine"))


def test_zero_terminal_snr_v_prediction_and_trailing_steps_are_saved_and_sampled_with(toy, tmp_path):
    small = load_preset("small").train  # the demo preset trains on the leak-free schedule (Lin et al. 2024)
    assert (small["prediction_type"], small["zero_snr"], small["timestep_spacing"]) == ("v_prediction", True,
                                                                                        "trailing")
    run = train(config(toy, tmp_path / "zsnr", steps=2, noise_schedule="ddpm", prediction_type="v_prediction",
                       zero_snr=True, timestep_spacing="trailing"))
    _, _, scheduler, cfg, _ = load_model_components(run.model_dir)
    sc = scheduler.config
    assert (sc.prediction_type, sc.rescale_betas_zero_snr, sc.timestep_spacing, sc.beta_schedule) == (
        "v_prediction", True, "trailing", "linear") and cfg.prediction_type == "v_prediction"
    assert scheduler.alphas_cumprod[-1] == 0 and scheduler.alphas_cumprod[0] > 0.99  # no signal left at t = T
    x0 = torch.ones(1, 3, 4, 4)
    assert torch.equal(scheduler.add_noise(x0, torch.zeros_like(x0), torch.tensor([999])), torch.zeros_like(x0))

    # Sampling uses what training used, with the model's sampler or one chosen at sample time.
    pipe = RDMPipeline.from_pretrained(run.model_dir)
    pipe.set_progress_bar_config(disable=True)
    steps = []
    for name in (None, "dpm++"):
        out = pipe(query_embeds=torch.randn(1, 32), neighbor_embeds=torch.randn(1, 2, 32), num_inference_steps=3,
                   scheduler=name, seed=0, output_type="np", callback=lambda i, t, _x: steps.append(t))
        used = out.provenance[0].scheduler["config"]
        assert (used["prediction_type"], used["rescale_betas_zero_snr"], used["timestep_spacing"]) == (
            "v_prediction", True, "trailing") and np.isfinite(out.images).all()
    assert steps[0] == steps[3] == 999  # trailing: both start at t = T

    # Fine-tuning keeps the schedule, or moves an epsilon model onto it; epsilon at zero SNR is refused.
    kept = load_model_components(train(config(toy, tmp_path / "kept", init=str(run.model_dir), steps=1)).model_dir)
    assert kept[2].config.rescale_betas_zero_snr and kept[3].prediction_type == "v_prediction"
    eps = train(config(toy, tmp_path / "eps", steps=1, noise_schedule="ddpm"))
    moved = train(config(toy, tmp_path / "moved", init=str(eps.model_dir), steps=1, prediction_type="v_prediction",
                         zero_snr=True, timestep_spacing="trailing"))
    _, _, scheduler, cfg, _ = load_model_components(moved.model_dir)
    assert scheduler.config.rescale_betas_zero_snr and cfg.prediction_type == scheduler.config.prediction_type == \
        "v_prediction" and scheduler.config.beta_schedule == "linear"
    with pytest.raises(RDMError, match="zero terminal SNR needs --prediction-type v_prediction"):
        train(config(toy, tmp_path / "bad", steps=1, zero_snr=True))
    with pytest.raises(RDMError, match="timestep_spacing must be one of"):
        train(config(toy, tmp_path / "bad2", steps=1, timestep_spacing="sideways"))


def test_neighbour_drop_trains_the_query_only_context_of_style_guidance(captioned, tmp_path):
    db = Database.open(captioned["db"], captioned["indexes"])
    data = prepare_training_data(open_source(captioned["data"]), db, api.embedder_for(db), None, 16, 4,
                                 DUP_THRESHOLD, cache_dir=captioned["cache"], progress=False, query="text")
    index = np.arange(8)
    batch = lambda **kw: make_batch(data, index, step_generator(0, 5, 0, 0), 1.0,  # noqa: E731
                                    config(captioned, tmp_path, query="text", cond_drop=0.0, **kw), 1000,
                                    torch.device("cpu"))
    plain, dropped = batch(), batch(neighbour_drop=0.5)
    for name in ("x0", "noise", "t"):  # drawn last: the other draws are those of a run without it
        torch.testing.assert_close(dropped[name], plain[name])
    torch.testing.assert_close(dropped["context"][:, 0], plain["context"][:, 0])  # the query is kept
    gone = (dropped["context"][:, 1:] == 0).all(2).all(1) & (plain["context"][:, 1:] != 0).any(2).any(1)
    assert 0 < gone.sum() < 8
    assert dropped["mask"][gone].all()  # unmasked zeros: what rdm.sampling.conditioning.query_only_context gives
    torch.testing.assert_close(dropped["context"][gone], cond.query_only_context(plain["context"])[gone])


@pytest.mark.parametrize("query", ["image", "mixed"])
@pytest.mark.filterwarnings("ignore:1 of 8 training images have no caption")
def test_resume_reaches_the_same_state_as_an_uninterrupted_run(toy, captioned, tmp_path, query):
    toy = toy if query == "image" else captioned
    settings = dict(grad_accum=2, batch_size=4, warmup_steps=5, steps=6, checkpoint_every=3, query=query)
    straight = train(config(toy, tmp_path / "straight", **settings))
    first = train(config(toy, tmp_path / "resumed", **dict(settings, steps=3)))
    with pytest.raises(RDMError, match="already holds a training run"):
        train(config(toy, tmp_path / "resumed", **settings))
    with pytest.raises(RDMError, match="lr"):
        train(config(toy, tmp_path / "resumed", resume=True, **dict(settings, lr=5e-4)))
    second = train(config(toy, tmp_path / "resumed", resume=True, **settings))
    assert (first.step, second.start_step, second.step) == (3, 3, 6)
    np.testing.assert_allclose(straight.losses[3:], second.losses, rtol=1e-6, atol=1e-7)

    a, b = _state(tmp_path / "straight", 6), _state(tmp_path / "resumed", 6)
    for name in a["weights"]:
        torch.testing.assert_close(a["weights"][name], b["weights"][name], rtol=0, atol=1e-7)
        torch.testing.assert_close(a["exported"][name], b["exported"][name], rtol=0, atol=1e-7)
    assert a["ema"]["optimization_step"] == b["ema"]["optimization_step"] == 6
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-7)
    for state in (a, b):
        assert {int(s["step"]) for s in state["optim"]["state"].values()} == {6}
    assert a["sched"]["last_epoch"] == b["sched"]["last_epoch"] == 6
    assert not torch.equal(a["weights"][next(iter(a["weights"]))], a["exported"][next(iter(a["weights"]))])


def test_a_resumed_adapter_run_makes_the_same_adapter_as_an_uninterrupted_one(toy, tmp_path, monkeypatch):
    """LoRA training (--adapter) stopped after 3 of 6 steps and resumed gives the adapter a straight run gives; the
    run's adapter lands in $RDM_ADAPTERS only when a run completes, and loads onto its base model."""
    from rdm.models.adapters import read_adapter

    monkeypatch.setenv("RDM_ADAPTERS", str(tmp_path / "adapters"))
    base = train(config(toy, tmp_path / "base", steps=2))
    settings = dict(init=str(base.model_dir), rank=2, targets="attention", batch_size=4, grad_accum=2, steps=6,
                    checkpoint_every=3, warmup_steps=0)
    straight = train(config(toy, tmp_path / "straight", adapter="straight", **settings))
    first = train(config(toy, tmp_path / "resumed", adapter="resumed", **dict(settings, steps=3)))
    second = train(config(toy, tmp_path / "resumed", adapter="resumed", resume=True, **settings))
    assert (first.step, second.start_step, second.step) == (3, 3, 6)
    np.testing.assert_allclose(straight.losses[3:], second.losses, rtol=1e-6, atol=1e-7)
    a, b = read_adapter("straight"), read_adapter("resumed")
    assert a.steps == b.steps == 6 and a.path.parent == b.path.parent == tmp_path / "adapters"
    wa, wb = load_file(str(a.path / "adapter_model.safetensors")), load_file(str(b.path / "adapter_model.safetensors"))
    assert set(wa) == set(wb) and any(".lora_B." in k and wa[k].abs().max() > 0 for k in wa)  # it learned
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-7)
    pipe = RDMPipeline.from_pretrained(base.model_dir)
    assert pipe.set_adapters([("resumed", 1.0)])[0]["steps"] == 6
    assert not any(p.name.startswith(".") for p in (tmp_path / "adapters").iterdir())  # no half-written folder left


def test_cli_train(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("RDM_CACHE", toy["cache"])
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(cli, ["--indexes", toy["indexes"], "train", "--data", toy["data"], "--db", toy["db"],
                                      "--out", str(out), "--preset", "tiny", "--steps", "3", "-k", "2",
                                      "--batch-size", "4", "--dedup-threshold", str(DUP_THRESHOLD),
                                      "--prediction-type", "v_prediction", "--zero-snr", "--timestep-spacing",
                                      "trailing", "--neighbour-drop", "0.2", "--mixed-precision", "bf16",
                                      "--sample-every", "-1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "steps      0 -> 3" in result.output
    _, _, scheduler, cfg, _ = load_model_components(out / "model")
    assert cfg.k == 2 and cfg.prediction_type == "v_prediction" == scheduler.config.prediction_type
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    assert json.loads((out / "train_config.json").read_text())["neighbour_drop"] == 0.2
    bad = CliRunner().invoke(cli, ["--indexes", toy["indexes"], "train", "--data", toy["data"], "--db", toy["db"],
                                   "--out", str(tmp_path / "x"), "--preset", "nope", "--quiet"])
    assert bad.exit_code == 1 and "no preset 'nope'" in bad.output


def test_cli_train_with_text_queries(captioned, tmp_path, monkeypatch):
    monkeypatch.setenv("RDM_CACHE", captioned["cache"])
    out = tmp_path / "cli-text"
    with pytest.warns(UserWarning, match="1 of 8 training images have no caption"):
        result = CliRunner().invoke(cli, ["--indexes", captioned["indexes"], "train", "--data", captioned["data"],
                                          "--db", captioned["db"], "--out", str(out), "--preset", "tiny", "--steps",
                                          "2", "--batch-size", "4", "--query", "text", "--dedup-threshold",
                                          str(DUP_THRESHOLD), "--sample-every", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "queries    text (1 images without a caption use their image embedding)" in result.output
    _, _, _, cfg, _ = load_model_components(out / "model")
    assert cfg.source["query"] == "text" and (out / "samples" / "step-0000002.png").is_file()  # text val queries
    assert json.loads((out / "train_config.json").read_text())["query"] == "text"
    assert load_preset("small").train["query"] == "text"  # the demo preset trains on text queries


def test_presets_are_data(tmp_path):
    assert {"tiny", "small", "base"} <= set(list_presets())
    small = load_preset("small")
    assert small.resolution == 64 and small.space in ("pixel", "latent")
    bad = json.loads((CONFIG_DIR / "tiny.json").read_text())
    bad["unet"]["cross_attention_dim"] = 8
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(RDMError, match="cross_attention_dim"):
        load_preset(str(tmp_path / "bad.json"))


def test_clear_errors(toy, tmp_path):
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, cross_attention_dim=16,
                                block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    folder = save_model_folder(tmp_path / "dim16", unet, None, DDIMScheduler(),
                               RDMConfig(embedder={"model": "x", "dim": 16}, embedding_dim=16, resolution=8,
                                         latent_channels=3))
    with pytest.raises(RDMError, match="16-d context tokens.*32-d"):
        train(config(toy, tmp_path / "a", init=str(folder), steps=1))
    with pytest.raises(RDMError, match="--vae"):
        train(config(toy, tmp_path / "b", preset="base", steps=1))


# --- fine-tuning the converted CompVis model ---------------------------------------------------------

@pytest.mark.parity  # the CompVis checkpoint, converted
def test_finetune_the_converted_compvis_model(toy, tmp_path, tiny_clip):
    init = convert_compvis_checkpoint(need(GOLDEN / "model.ckpt"), GOLDEN / "config.yaml", tmp_path / "golden",
                                      clip=tiny_clip, clip_dim=32, k=4)
    before = load_model_components(init)[0].state_dict()
    result = train(config(toy, tmp_path / "ft", init=str(init), steps=2, batch_size=2, lr=1e-3))
    unet, vae, _, cfg, _ = load_model_components(result.model_dir)
    assert vae is not None and vae.config.latent_channels == 16
    assert (cfg.resolution, cfg.latent_channels, cfg.latent_scale_factor) == (128, 16, pytest.approx(0.22765929))
    assert cfg.source["init_source"]["format"] == "compvis-latent-diffusion"
    changed = [n for n, w in unet.state_dict().items() if not torch.equal(w, before[n])]
    assert len(changed) > 0.5 * len(before)
    assert np.isfinite(result.losses).all()


# --- the autoencoder ---------------------------------------------------------------------------------

def test_train_vae_then_train_in_latent_space(toy, tmp_path):
    vae_dir = tmp_path / "vae"
    result = train_vae(VAETrainConfig(data=toy["data"], out=str(vae_dir), preset="tiny", steps=5, progress=False))
    assert len(result.losses) == 5 and np.isfinite(result.losses).all()
    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert vae.config.scaling_factor == pytest.approx(result.latent_scale_factor)
    assert result.latent_shape == (4, 8, 8) and json.loads((vae_dir / "train_vae.json").read_text())["steps"] == 5
    with pytest.raises(RDMError, match="not empty"):
        train_vae(VAETrainConfig(data=toy["data"], out=str(vae_dir), preset="tiny", steps=1, progress=False))

    run = train(config(toy, tmp_path / "latent", vae=str(vae_dir), steps=2))
    unet, vae, _, cfg, _ = load_model_components(run.model_dir)
    assert vae is not None and cfg.latent_channels == 4 and unet.config.sample_size == 8
    assert cfg.latent_scale_factor == pytest.approx(run.data["latent_scale_factor"]) and cfg.latent_scale_factor > 0

"""RDMPipeline reproduces the original CompVis sampler, and retrieval conditions it as the RDM papers say."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file

from rdm import RDMPipeline, api
from rdm.db.database import Database
from rdm.errors import RDMError
from rdm.models.format import RDMConfig, save_model_folder
from rdm.models.tiny import TINY_CLIP_CFG, make_tiny_clip, make_tiny_rdm
from rdm.sampling import conditioning as cond
from rdm.sampling.generate import convert
from tests.helpers.world import GOLDEN, make_folder, need

FAST = dict(num_inference_steps=2, output_type="np")  # enough steps to see the conditioning act


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def golden():
    return load_file(str(need(GOLDEN / "golden.safetensors")))


@pytest.fixture(scope="module")
def settings():
    return json.loads((need(GOLDEN) / "golden.json").read_text())


@pytest.fixture(scope="module")
def golden_pipe(tmp_path_factory, tiny_clip) -> RDMPipeline:
    """The golden CompVis checkpoint converted with the tiny CLIP (dim 32 = the golden context_dim)."""
    out = tmp_path_factory.mktemp("golden") / "rdm-small"
    p = RDMPipeline.from_pretrained(convert(need(GOLDEN / "model.ckpt"), GOLDEN / "config.yaml", tiny_clip, out).path)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_clip) -> Path:
    """A tiny latent-space model of the golden one's layout (k 4, autoencoder downsampling 16x) for the tiny CLIP."""
    identity = api.load_embedder(tiny_clip).identity.to_dict()
    return make_tiny_rdm(tmp_path_factory.mktemp("model") / "rdm-tiny", identity, resolution=64, k=4, vae_factor=16)


@pytest.fixture(scope="module")
def pipe(model_dir) -> RDMPipeline:
    p = RDMPipeline.from_pretrained(model_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def dbs(tmp_path_factory, tiny_clip) -> Path:
    """A databases home with A (12 pictures) and B (10 other pictures), both embedded by the tiny CLIP."""
    root = tmp_path_factory.mktemp("dbs")
    for name, n, seed in (("A", 12, 100), ("B", 10, 500)):
        make_folder(root / f"pics{name}", n, seed=seed)
        api.build_index(str(root / f"pics{name}"), name=name, clip=tiny_clip, indexes=str(root / "indexes"),
                        workers=0, progress=False)
    return root / "indexes"


def _contexts(pipe: RDMPipeline) -> tuple[list, object]:
    """Record the encoder_hidden_states of every U-Net call."""
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    return seen, hook


# --- 1. Golden equivalence through the pipeline ---------------------------------------------------

@pytest.mark.parity
def test_pipeline_reproduces_compvis_ddim(golden_pipe, golden, settings):
    pipe = golden_pipe
    ctx = golden["ddim_context"]  # (B, 1+k, D): query then neighbours
    args = dict(query_embeds=ctx[:, 0], neighbor_embeds=ctx[:, 1:], latents=golden["ddim_xT"],
                num_inference_steps=settings["ddim_steps"], guidance_scale=settings["guidance_scale"])
    out = pipe(**args, output_type="pt")
    image_err = (out.images - golden["ddim_images"]).abs().max().item()
    latent_err = ((out.latents - golden["ddim_latents"]).abs().max() / golden["ddim_latents"].abs().max()).item()
    print(f"golden through RDMPipeline: images max abs {image_err:.2e}, latents max rel {latent_err:.2e}")
    assert image_err < 1e-4 and latent_err < 1e-5
    assert pipe.scheduler.timesteps.flip(0).tolist() == golden["ddim_timesteps"].tolist()
    as_np = pipe(**args, output_type="np").images  # (B, H, W, 3)
    assert np.abs(as_np - golden["ddim_images"].permute(0, 2, 3, 1).numpy()).max() < 1e-4


def test_components_are_diffusers_defaults(pipe, model_dir, tmp_path):
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.vae_scale_factor == 16
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())  # PyTorch SDPA
    assert pipe.fingerprint is not None and pipe.name_or_path == str(model_dir.resolve())
    pipe.save_pretrained(tmp_path / "copy")
    again = RDMPipeline.from_pretrained(tmp_path / "copy")
    assert again.fingerprint == pipe.fingerprint and again.rdm_config == pipe.rdm_config
    assert json.loads((tmp_path / "copy" / "model_index.json").read_text())["_class_name"] == "RDMPipeline"


def test_pixel_space_folder_without_vae(tmp_path, tiny_clip):
    unet = UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                layers_per_block=1, attention_head_dim=4, norm_num_groups=8)
    config = RDMConfig(embedder={"model": tiny_clip, "dim": 32}, embedding_dim=32, resolution=16, latent_channels=3,
                       k=2, unconditional="learned")
    save_model_folder(tmp_path / "pixels", unet, None, DDIMScheduler(), config, null_context=torch.zeros(3, 32))
    assert json.loads((tmp_path / "pixels" / "model_index.json").read_text())["vae"] == [None, None]
    pixels = RDMPipeline.from_pretrained(tmp_path / "pixels")
    pixels.set_progress_bar_config(disable=True)
    assert pixels.vae is None and pixels.vae_scale_factor == 1 and pixels.null_context.shape == (3, 32)
    out = pixels(query_embeds=torch.randn(1, 32), neighbor_embeds=torch.randn(1, 2, 32), seed=0, **FAST)
    assert out.images.shape == (1, 16, 16, 3) and out.latents.shape == (1, 3, 16, 16)


# --- 2. Determinism --------------------------------------------------------------------------------

def test_same_seed_same_image_and_one_seed_per_image(pipe, dbs):
    run = lambda seed, n=1: pipe("a red circle", databases="A", indexes=dbs, seed=seed,  # noqa: E731
                                 num_images_per_prompt=n, **FAST)
    first, again, other = run(3), run(3), run(4)
    assert np.array_equal(first.images, again.images)
    assert np.abs(first.images - other.images).max() > 1e-3
    pair = run(3, n=2)  # image i has seed 3 + i, so each can be remade alone
    assert [p.seed for p in pair.provenance] == [3, 4]
    assert np.abs(pair.images[1] - other.images[0]).max() < 1e-5  # batched kernels differ only in rounding


def test_scheduler_by_name(pipe, dbs):
    out = pipe("a red circle", databases="A", indexes=dbs, seed=1, scheduler="dpm++", **FAST)
    record = out.provenance[0].scheduler
    assert record["name"] == "DPMSolverMultistepScheduler" and record["config"]["algorithm_type"] == "dpmsolver++"
    assert isinstance(pipe.scheduler, DDIMScheduler)  # the model's own scheduler is left as it was
    euler = pipe("a red circle", seed=1, scheduler="EulerDiscreteScheduler", **FAST)
    assert euler.provenance[0].scheduler["name"] == "EulerDiscreteScheduler" and np.isfinite(euler.images).all()
    with pytest.raises(RDMError, match="unknown scheduler 'warp'.*dpm\\+\\+"):
        pipe("a red circle", seed=1, scheduler="warp", **FAST)


# --- 3. Conditioning -------------------------------------------------------------------------------

def test_context_is_query_then_stored_neighbours_by_similarity_with_zeros_unconditional(pipe, dbs):
    seen, hook = _contexts(pipe)
    try:
        out = pipe("a red circle", databases="A", indexes=dbs, k=3, seed=0, num_images_per_prompt=2, **FAST)
    finally:
        hook.remove()
    context = seen[0]  # (2B, 1+k, D): unconditional rows first
    assert context.shape == (4, 4, 32) and all(torch.equal(c, context) for c in seen)
    assert torch.count_nonzero(context[:2]) == 0
    db = Database.open("A", dbs)
    query = pipe.embedder.encode_text(["a red circle"])  # (1, D)
    hits = out.provenance[0].neighbours
    rows = [h["row"] for h in hits]
    assert np.allclose(context[2, 0].numpy(), query[0], atol=1e-6)  # the query token first
    assert np.array_equal(context[2, 1:].numpy(), db.vectors[rows])  # the stored vectors, exactly
    assert torch.equal(context[2], context[3])  # both images of the prompt share its neighbours
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert rows == db.search(query, k=3).rows[0].tolist()
    assert {h["database"] for h in hits} == {"A"} and all(h["path"].endswith(h["id"]) for h in hits)


def test_build_context_layouts():
    q, n = torch.randn(2, 8), torch.randn(2, 3, 8)
    ctx = cond.build_context(q, n)
    assert ctx.shape == (2, 4, 8) and torch.equal(ctx[:, 0], q) and torch.equal(ctx[:, 1:], n)
    assert torch.equal(cond.build_context(None, n, query_token=False), n)  # neighbours-only models
    assert cond.build_context(q, n[:, :0]).shape == (2, 1, 8)  # --db none: the query alone
    with pytest.raises(RDMError, match="query"):
        cond.build_context(None, n)
    with pytest.raises(RDMError, match="neighbours only"):
        cond.build_context(None, n[:, :0], query_token=False)


def test_unconditional_contexts():
    ctx = torch.randn(2, 5, 8)
    assert torch.equal(cond.unconditional_context(ctx), torch.zeros_like(ctx))
    null = torch.randn(5, 8)
    learned = cond.unconditional_context(ctx, "learned", null)
    assert learned.shape == ctx.shape and torch.equal(learned[1], null)
    assert torch.equal(cond.unconditional_context(ctx, "learned", null[:1])[1, 4], null[0])  # one token, broadcast
    with pytest.raises(RDMError, match="3 tokens"):
        cond.unconditional_context(ctx, "learned", null[:3])


def test_largest_remainder_and_database_specs():
    assert cond.largest_remainder(4, [1, 0.3]) == [3, 1]
    assert cond.largest_remainder(5, [1, 1, 1]) == [2, 2, 1]
    assert cond.largest_remainder(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert cond.largest_remainder(3, [1, 0]) == [3, 0]
    assert all(sum(cond.largest_remainder(k, [0.7, 0.2, 0.1])) == k for k in range(20))
    with pytest.raises(RDMError, match="weights"):
        cond.largest_remainder(4, [0, 0])
    assert cond.parse_database_spec("b:0.3") == ("b", 0.3)
    assert cond.parse_database_spec("wikiart") == ("wikiart", 1.0)
    assert cond.parse_database_spec("/data/idx:v2") == ("/data/idx:v2", 1.0)


def test_several_databases_in_proportion_merged_by_similarity(pipe, dbs):
    out = pipe("a red circle", databases=["A", "B:0.3"], indexes=dbs, k=4, seed=0, **FAST)
    record = out.provenance[0]
    assert [(d["name"], d["k_drawn"]) for d in record.databases] == [("A", 3), ("B", 1)]
    assert sorted(h["database"] for h in record.neighbours) == ["A", "A", "A", "B"]
    scores = [h["score"] for h in record.neighbours]
    assert scores == sorted(scores, reverse=True)
    assert all(len(d["fingerprint"]) == 16 for d in record.databases)


def test_k_beyond_the_database_is_clamped_with_a_warning(pipe, dbs):
    with pytest.warns(UserWarning, match="holds only 12 items"):
        out = pipe("a red circle", databases="A", indexes=dbs, k=50, seed=0, **FAST)
    record = out.provenance[0]
    assert record.k == 12 and len(record.neighbours) == 12 and "holds only 12" in record.warnings[0]


def test_filters_are_applied_inside_the_search(pipe, dbs):
    with pytest.warns(UserWarning, match="match the filters"):
        out = pipe("a red circle", databases="A", indexes=dbs, where=["id=img003.png", "id=img007.png"], k=4,
                   seed=0, **FAST)
    assert sorted(h["id"] for h in out.provenance[0].neighbours) == ["img003.png", "img007.png"]
    assert out.provenance[0].where == {"id": ["img003.png", "img007.png"]}


def test_refs_act_as_neighbours(pipe, tmp_path):
    names = make_folder(tmp_path / "refs", 3, seed=900)
    refs = [str(tmp_path / "refs" / n) for n in names]
    seen, hook = _contexts(pipe)
    try:
        out = pipe("a red circle", refs=refs, seed=0, **FAST)
    finally:
        hook.remove()
    hits = out.provenance[0].neighbours
    assert sorted(h["ref"] for h in hits) == refs and out.provenance[0].databases[0]["name"] == "refs"
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    from rdm.images.decode import decode_image

    embedded = pipe.embedder.encode_images([decode_image(h["ref"]) for h in hits])
    assert np.allclose(seen[0][1, 1:].numpy(), embedded, atol=1e-6)


def test_image_query_finds_itself_first(pipe, dbs):
    db = Database.open("A", dbs)
    picture = db.records([5])[0]["path"]
    out = pipe(image=picture, databases="A", indexes=dbs, k=2, seed=0, **FAST)
    record = out.provenance[0]
    assert record.query == {"image": picture}
    assert record.neighbours[0]["row"] == 5 and record.neighbours[0]["score"] > 0.99


def test_neighbours_only_model_with_learned_null_context(pipe, dbs):
    config = dataclasses.replace(pipe.rdm_config, query_token=False, unconditional="learned")
    null = torch.randn(3, 32)  # (T, D): one learned token per neighbour
    other = RDMPipeline(unet=pipe.unet, vae=pipe.vae, scheduler=pipe.scheduler, rdm_config=config,
                        null_context=null, embedder=pipe.embedder)
    other.set_progress_bar_config(disable=True)
    seen, hook = _contexts(other)
    try:
        out = other("a red circle", databases="A", indexes=dbs, k=3, seed=0, **FAST)
    finally:
        hook.remove()
    rows = [h["row"] for h in out.provenance[0].neighbours]
    assert seen[0].shape == (2, 3, 32) and torch.equal(seen[0][0], null)  # (2B, k, D): learned, then neighbours
    assert np.array_equal(seen[0][1].numpy(), Database.open("A", dbs).vectors[rows])


def test_no_database_conditions_on_the_query_alone(pipe):
    seen, hook = _contexts(pipe)
    try:
        out = pipe("a red circle", seed=0, **FAST)
    finally:
        hook.remove()
    assert seen[0].shape == (2, 1, 32) and out.provenance[0].neighbours == [] and out.provenance[0].databases == []



# --- 3b. Style strength: two-condition guidance ------------------------------------------------------

def test_style_scale_batches_three_contexts_in_one_unet_call(pipe, dbs):
    seen, hook = _contexts(pipe)
    try:
        out = pipe("a red circle", databases="A", indexes=dbs, k=3, seed=0, num_images_per_prompt=2,
                   style_scale=2.0, **FAST)
    finally:
        hook.remove()
    assert len(seen) == FAST["num_inference_steps"]  # one U-Net call per step
    context = seen[0]  # (3B, 1+k, D): unconditional, the query alone, query + neighbours
    assert context.shape == (6, 4, 32) and all(torch.equal(c, context) for c in seen)
    uncond, query_only, full = context.chunk(3)
    assert torch.count_nonzero(uncond) == 0
    rows = [h["row"] for h in out.provenance[0].neighbours]
    assert np.array_equal(full[0, 1:].numpy(), Database.open("A", dbs).vectors[rows])
    assert torch.equal(query_only[:, 0], full[:, 0]) and torch.count_nonzero(query_only[:, 1:]) == 0
    assert out.provenance[0].scheduler["style_scale"] == 2.0 and out.provenance[0].scheduler["guidance_scale"] == 5.0


def test_style_scale_zero_gives_the_query_alone_and_equal_scales_plain_guidance(pipe, dbs):
    query = pipe.embedder.encode_text(["a red circle"])
    neighbours = Database.open("A", dbs).vectors[None, :3]  # (1, 3, D)
    run = lambda n, **kw: pipe(query_embeds=query, neighbor_embeds=n, seed=5, guidance_scale=3.0, **kw,  # noqa: E731
                               **FAST).images
    plain, zeroed = run(neighbours), run(np.zeros_like(neighbours))  # neighbour slots zero: the query alone
    no_style = run(neighbours, style_scale=0.0)
    assert np.abs(no_style - zeroed).max() < 1e-5  # batched 3B vs 2B kernels differ only in rounding
    assert np.abs(no_style - plain).max() > 1e-3  # ... and the neighbours did matter
    assert np.abs(run(neighbours, style_scale=3.0) - plain).max() < 1e-5  # s_nn = s_q: plain guidance
    assert np.abs(run(neighbours, style_scale=6.0) - plain).max() > 1e-3
    assert pipe(query_embeds=query, neighbor_embeds=neighbours, seed=5, **FAST).provenance[0].scheduler[
        "style_scale"] is None  # the default: plain guidance, recorded as such


def test_style_guidance_formula():
    e0, eq, eqn = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([4.0])
    assert cond.style_guided_noise(e0, eq, eqn, 3.0, 0.5).item() == 1 + 3 * 1 + 0.5 * 2
    assert torch.equal(cond.style_guided_noise(e0, eq, eqn, 2.0, 2.0), cond.guided_noise(e0, eqn, 2.0))
    ctx = torch.randn(2, 4, 8)
    q = cond.query_only_context(ctx)
    assert torch.equal(q[:, 0], ctx[:, 0]) and torch.count_nonzero(q[:, 1:]) == 0 and q.shape == ctx.shape


def test_a_sampler_chosen_at_sample_time_keeps_the_trained_schedule():
    from diffusers import DPMSolverMultistepScheduler

    from rdm.sampling.pipeline import make_scheduler, trained_schedule

    trained = DDIMScheduler(beta_schedule="linear", rescale_betas_zero_snr=True, prediction_type="v_prediction",
                            timestep_spacing="trailing", clip_sample=True)
    for name in ("dpm++", "euler", "unipc", "ddpm"):
        sampler = make_scheduler(name, trained)
        assert trained_schedule(sampler) == trained_schedule(trained) == {
            "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, name
    dpm = make_scheduler("dpm++", trained)
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == "dpmsolver++"
    dpm.set_timesteps(5)
    assert int(dpm.timesteps[0]) == 999  # trailing: sampling starts at t = T, where the rescaled SNR is zero
    for name in ("plms", "heun", "deis"):  # no zero-SNR rescaling: refused, not silently lost
        with pytest.raises(RDMError, match="cannot sample with the model's .*rescale_betas_zero_snr=True"):
            make_scheduler(name, trained)
    assert isinstance(make_scheduler("plms", DDIMScheduler()), type(make_scheduler("pndm", DDIMScheduler())))


# --- 4. Errors -------------------------------------------------------------------------------------

def test_database_of_another_embedder_is_refused_naming_both(pipe, tmp_path, tiny_clip):
    other_clip = make_tiny_clip(tmp_path / "other_clip", seed=1)  # same architecture and dim, other weights
    smaller = make_tiny_clip(tmp_path / "small_clip", model_cfg={**TINY_CLIP_CFG, "embed_dim": 16})
    make_folder(tmp_path / "pics", 4)
    for name, clip in (("other", other_clip), ("small", smaller)):
        api.build_index(str(tmp_path / "pics"), name=name, clip=clip, indexes=str(tmp_path / "idx"), workers=0,
                        progress=False)
        with pytest.raises(RDMError) as e:
            pipe("a red circle", databases=name, indexes=tmp_path / "idx", **FAST)
        assert clip in str(e.value) and tiny_clip in str(e.value)
    assert cond.same_embedder({"model": "x", "dim": 32}, {"model": "x", "dim": 32, "weights_sha256": "ab"})
    assert not cond.same_embedder({"model": "x", "dim": 32}, {"model": "x", "dim": 16})


def test_input_errors(pipe, dbs):
    with pytest.raises(RDMError, match="height 100 is not a positive multiple of 16.*96"):
        pipe("a red circle", height=100, **FAST)
    with pytest.raises(RDMError, match="empty prompt"):
        pipe("  ", **FAST)
    with pytest.raises(RDMError, match="no database 'C'.*existing: A, B"):
        pipe("a red circle", databases="C", indexes=dbs, **FAST)
    with pytest.raises(RDMError, match="one kind of query"):
        pipe("a red circle", query_embeds=torch.zeros(1, 32), **FAST)
    with pytest.raises(RDMError, match="neighbor_embeds must be"):
        pipe(query_embeds=torch.zeros(1, 32), neighbor_embeds=torch.zeros(1, 4, 16), **FAST)


def test_other_size_runs(pipe):
    out = pipe("a red circle", seed=0, height=64, width=96, **FAST)
    assert out.images.shape == (1, 64, 96, 3) and out.provenance[0].size == {"height": 64, "width": 96}

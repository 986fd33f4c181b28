"""Convert a CompVis/latent-diffusion RDM checkpoint (`.ckpt` + its `config.yaml`) to an rdm model folder.

The YAML's `ldm.models.diffusion.ddpm.LatentDiffusion` holds three parts, each mapped to diffusers:

- `unet_config` (`ldm/modules/diffusionmodules/openaimodel.py` UNetModel) -> `UNet2DConditionModel`.
  `attention_resolutions` are downsampling factors: level l has attention iff 2**l is listed. Heads
  per level are channels // num_head_channels, as in CompVis; diffusers reads its `attention_head_dim`
  as the number of heads (huggingface/diffusers#2011), so that is where the head counts go.
  `use_linear_in_transformer: false` (conv 1x1 proj_in/out) is `use_linear_projection=False`.
- `first_stage_config` (`ldm/models/autoencoder.py` AutoencoderKL, `ldm/modules/diffusionmodules/model.py`
  Encoder/Decoder) -> `AutoencoderKL`. CompVis puts an AttnBlock after every ResnetBlock of the levels
  whose resolution is in `attn_resolutions`; diffusers' own LDM converter drops them. Here those levels
  use diffusers' `AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D`, which `get_down_block` /
  `get_up_block` accept and which the VAE Encoder/Decoder build with one head of full width
  (`attention_head_dim=output_channel`), GroupNorm(32, eps=1e-6), bias, residual and 1/sqrt(C)
  scaling: exactly CompVis's AttnBlock, so no subclass is needed (the golden test checks it numerically).
  The mid-block attention, `double_z`, quant_conv/post_quant_conv (needs embed_dim == z_channels) and
  the decoder's num_res_blocks+1 ResnetBlocks per level map one to one.
- the DDPM schedule -> `DDIMScheduler` with betas = linspace(sqrt(linear_start), sqrt(linear_end))**2
  ("scaled_linear"), "leading" spacing + steps_offset=1 (CompVis "uniform": 1, 101, ..., 901 for 10
  steps) and set_alpha_to_one=False (the last step's previous alpha is alphas_cumprod[0]), as in
  `ldm/models/diffusion/ddim.py`. Identical timesteps need a step count dividing num_train_timesteps:
  CompVis's range(0, T, T // S) yields more than S steps otherwise.

Weights: `model.diffusion_model.*` (raw) or its EMA copy `model_ema.<name without dots>` (default,
what `model.ema_scope()` samples with), and `first_stage_model.*`. Every key must map onto the
diffusers model and every diffusers parameter must be filled; anything else is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from ...errors import RDMError
from ..format import RDMConfig, SamplingDefaults, save_model_folder
from .safe_load import load_checkpoint

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
# DDPM.register_schedule buffers and LitEma bookkeeping: not weights of either network.
SCHEDULE_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates",
}


# --- 1. The YAML ------------------------------------------------------------------------------------

def read_compvis_config(config_path) -> dict:
    """`model.params` of a CompVis LatentDiffusion config.yaml, checked to be a cross-attention LDM."""
    try:
        cfg = yaml.safe_load(Path(config_path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RDMError(f"cannot read CompVis config {config_path}: {e}") from e
    model = (cfg or {}).get("model") or {}
    params = model.get("params") or {}
    if not model.get("target", "").endswith("LatentDiffusion") or "unet_config" not in params:
        raise RDMError(f"{config_path} is not a CompVis LatentDiffusion config (model.target: {model.get('target')})")
    if params.get("conditioning_key") != "crossattn":
        raise RDMError(f"{config_path}: conditioning_key is {params.get('conditioning_key')!r}; RDMs use 'crossattn'")
    return params


def _refuse(params: dict, rules: dict, where: str) -> None:
    """Raise if a CompVis option takes a value this converter does not reproduce."""
    for key, (default, allowed) in rules.items():
        value = params.get(key, default)
        if value not in allowed:
            raise RDMError(f"{where}: {key}={value!r} is not supported by the converter (supported: {allowed})")


def unet_attention_levels(p: dict) -> list[bool]:
    """Level l has attention iff its downsampling factor 2**l is in attention_resolutions (openaimodel.py)."""
    return [2**level in p["attention_resolutions"] for level in range(len(p["channel_mult"]))]


def unet_config_from_compvis(p: dict) -> dict:
    """diffusers UNet2DConditionModel config equal to CompVis `openaimodel.UNetModel(**p)`."""
    _refuse(p, {"use_spatial_transformer": (False, [True]), "use_scale_shift_norm": (False, [False]),
                "resblock_updown": (False, [False]), "conv_resample": (True, [True]), "dims": (2, [2]),
                "num_classes": (None, [None]), "n_embed": (None, [None]),
                "disable_self_attentions": (None, [None]), "num_attention_blocks": (None, [None])}, "unet_config")
    if not all(isinstance(p.get(k), int) for k in ("num_res_blocks", "context_dim", "model_channels")):
        raise RDMError("unet_config: num_res_blocks, context_dim and model_channels must be single integers")
    channels = [p["model_channels"] * m for m in p["channel_mult"]]
    head_channels = p.get("num_head_channels", -1)
    if head_channels == -1:
        heads = [p["num_heads"]] * len(channels)
    elif all(c % head_channels == 0 for c in channels):
        heads = [c // head_channels for c in channels]
    else:
        raise RDMError(f"unet_config: num_head_channels {head_channels} does not divide the channels {channels}")
    attn = unet_attention_levels(p)
    return {
        "sample_size": p["image_size"],
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": channels,
        "layers_per_block": p["num_res_blocks"],
        "attention_head_dim": heads,  # diffusers reads this as the head count per level (diffusers#2011)
        "cross_attention_dim": p["context_dim"],
        "transformer_layers_per_block": p.get("transformer_depth", 1),
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "norm_num_groups": 32,  # openaimodel.normalization: GroupNorm32(32, ch), eps 1e-5
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,  # timestep_embedding: cat([cos, sin]), frequencies exp(-ln(1e4) * i / half)
        "freq_shift": 0,
        "act_fn": "silu",
        "downsample_padding": 1,
        "mid_block_scale_factor": 1.0,
    }


def vae_attention_levels(dd: dict) -> list[bool]:
    """Level l has AttnBlocks iff its resolution `resolution // 2**l` is in attn_resolutions (model.py)."""
    return [dd["resolution"] // 2**level in dd["attn_resolutions"] for level in range(len(dd["ch_mult"]))]


def vae_config_from_compvis(first_stage: dict, scale_factor: float, sample_size: int) -> dict:
    """diffusers AutoencoderKL config equal to CompVis `autoencoder.AutoencoderKL(**first_stage)`."""
    dd = first_stage["ddconfig"]
    _refuse(dd, {"double_z": (True, [True]), "resamp_with_conv": (True, [True]), "attn_type": ("vanilla", ["vanilla"]),
                 "use_linear_attn": (False, [False]), "give_pre_end": (False, [False]),
                 "tanh_out": (False, [False])}, "first_stage_config.ddconfig")
    if first_stage["embed_dim"] != dd["z_channels"]:
        raise RDMError(f"first_stage_config: embed_dim {first_stage['embed_dim']} != z_channels {dd['z_channels']}; "
                       "diffusers' AutoencoderKL needs them equal")
    attn = vae_attention_levels(dd)
    return {
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": dd["z_channels"],
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": scale_factor,
    }


def scheduler_config_from_compvis(params: dict) -> dict:
    """DDIMScheduler config reproducing CompVis DDIMSampler (ddim.py) on the DDPM "linear" schedule."""
    _refuse(params, {"beta_schedule": ("linear", ["linear"]), "parameterization": ("eps", ["eps", "v"])}, "model")
    return {
        "num_train_timesteps": params.get("timesteps", 1000),
        "beta_start": params.get("linear_start", 1e-4),
        "beta_end": params.get("linear_end", 2e-2),
        "beta_schedule": "scaled_linear",  # ddpm.make_beta_schedule("linear") is linear in sqrt(beta)
        "clip_sample": False,
        "set_alpha_to_one": False,  # ddim.make_ddim_sampling_parameters: alphas_prev[0] = alphas_cumprod[0]
        "steps_offset": 1,  # make_ddim_timesteps("uniform"): range(0, T, T // S) + 1
        "timestep_spacing": "leading",
        "prediction_type": "v_prediction" if params.get("parameterization") == "v" else "epsilon",
    }


def native_resolution(params: dict) -> int:
    """Image size in pixels: U-Net image_size times the autoencoder's downsampling 2**(len(ch_mult)-1)."""
    ch_mult = params["first_stage_config"]["params"]["ddconfig"]["ch_mult"]
    return params["unet_config"]["params"]["image_size"] * 2 ** (len(ch_mult) - 1)


def build_models(params: dict, device=None):
    """(unet, vae, scheduler) of a LatentDiffusion config; pass device="meta" to allocate nothing."""
    unet_cfg = unet_config_from_compvis(params["unet_config"]["params"])
    vae_cfg = vae_config_from_compvis(params["first_stage_config"]["params"], params.get("scale_factor", 1.0),
                                      native_resolution(params))
    with torch.device(device or "cpu"):
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
    return unet, vae, DDIMScheduler(**scheduler_config_from_compvis(params))


def count_parameters_from_config(config_path) -> dict[str, int]:
    """{"unet": n, "vae": n} parameters of the converted architecture, built on the meta device."""
    unet, vae, _ = build_models(read_compvis_config(config_path), device="meta")
    return {"unet": sum(p.numel() for p in unet.parameters()), "vae": sum(p.numel() for p in vae.parameters())}


# --- 2. The key mapping -----------------------------------------------------------------------------

# openaimodel.ResBlock (in_layers, emb_layers, out_layers, skip_connection) -> diffusers ResnetBlock2D.
UNET_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                     "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# model.ResnetBlock -> ResnetBlock2D: only the 1x1 shortcut is renamed.
VAE_RESNET_NAMES = {"nin_shortcut": "conv_shortcut"}
# model.AttnBlock (1x1 convs) -> diffusers Attention (Linear layers).
VAE_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# attention.SpatialTransformer keeps its names in diffusers' Transformer2DModel.
SAME_NAMES: dict = {}


def unet_module_map(p: dict) -> dict[str, tuple[str, dict]]:
    """CompVis UNetModel module -> (diffusers module, inner renames), in openaimodel.py build order."""
    levels, blocks, attn = len(p["channel_mult"]), p["num_res_blocks"], unet_attention_levels(p)
    m = {"time_embed.0": ("time_embedding.linear_1", SAME_NAMES),
         "time_embed.2": ("time_embedding.linear_2", SAME_NAMES),
         "input_blocks.0.0": ("conv_in", SAME_NAMES),
         "middle_block.0": ("mid_block.resnets.0", UNET_RESNET_NAMES),
         "middle_block.1": ("mid_block.attentions.0", SAME_NAMES),
         "middle_block.2": ("mid_block.resnets.1", UNET_RESNET_NAMES),
         "out.0": ("conv_norm_out", SAME_NAMES), "out.2": ("conv_out", SAME_NAMES)}
    i = 1  # input_blocks: [ResBlock, SpatialTransformer?] per block, then [Downsample] between levels
    for level in range(levels):
        for j in range(blocks):
            m[f"input_blocks.{i}.0"] = (f"down_blocks.{level}.resnets.{j}", UNET_RESNET_NAMES)
            if attn[level]:
                m[f"input_blocks.{i}.1"] = (f"down_blocks.{level}.attentions.{j}", SAME_NAMES)
            i += 1
        if level < levels - 1:
            m[f"input_blocks.{i}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", SAME_NAMES)
            i += 1
    i = 0  # output_blocks: deepest level first, blocks+1 per level, Upsample appended to the last one
    for up, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            m[f"output_blocks.{i}.0"] = (f"up_blocks.{up}.resnets.{j}", UNET_RESNET_NAMES)
            if attn[level]:
                m[f"output_blocks.{i}.1"] = (f"up_blocks.{up}.attentions.{j}", SAME_NAMES)
            if j == blocks and level > 0:
                m[f"output_blocks.{i}.{1 + attn[level]}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", SAME_NAMES)
            i += 1
    return m


def vae_module_map(dd: dict) -> dict[str, tuple[str, dict]]:
    """CompVis autoencoder module -> (diffusers module, inner renames), per model.py Encoder/Decoder."""
    levels, blocks, attn = len(dd["ch_mult"]), dd["num_res_blocks"], vae_attention_levels(dd)
    m = {"quant_conv": ("quant_conv", SAME_NAMES), "post_quant_conv": ("post_quant_conv", SAME_NAMES)}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", SAME_NAMES)
        m[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", VAE_RESNET_NAMES)
        m[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", VAE_ATTENTION_NAMES)
        m[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", VAE_RESNET_NAMES)
        m[f"{part}.norm_out"] = (f"{part}.conv_norm_out", SAME_NAMES)
        m[f"{part}.conv_out"] = (f"{part}.conv_out", SAME_NAMES)
    for level in range(levels):
        down = f"encoder.down_blocks.{level}"
        up = f"decoder.up_blocks.{levels - 1 - level}"  # Decoder.up is indexed by level; diffusers' runs deepest first
        for j in range(blocks):
            m[f"encoder.down.{level}.block.{j}"] = (f"{down}.resnets.{j}", VAE_RESNET_NAMES)
            if attn[level]:
                m[f"encoder.down.{level}.attn.{j}"] = (f"{down}.attentions.{j}", VAE_ATTENTION_NAMES)
        for j in range(blocks + 1):
            m[f"decoder.up.{level}.block.{j}"] = (f"{up}.resnets.{j}", VAE_RESNET_NAMES)
            if attn[level]:
                m[f"decoder.up.{level}.attn.{j}"] = (f"{up}.attentions.{j}", VAE_ATTENTION_NAMES)
        if level < levels - 1:
            m[f"encoder.down.{level}.downsample.conv"] = (f"{down}.downsamplers.0.conv", SAME_NAMES)
        if level > 0:
            m[f"decoder.up.{level}.upsample.conv"] = (f"{up}.upsamplers.0.conv", SAME_NAMES)
    return m


def map_key(key: str, module_map: dict[str, tuple[str, dict]]) -> str | None:
    """Diffusers name of CompVis parameter `key` (longest module prefix wins), None if unmapped."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in module_map:
            target, renames = module_map[prefix]
            inner, param = ".".join(parts[n:-1]), parts[-1]
            inner = renames.get(inner, inner)
            return ".".join(x for x in (target, inner, param) if x)
    return None


def ema_key(unet_key: str) -> str:
    """LitEma's name for `model.diffusion_model.X.Y`: `model_ema.diffusion_modelXY` (ldm/modules/ema.py)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def conv1x1_to_linear(w: torch.Tensor) -> torch.Tensor:
    """AttnBlock's q/k/v/proj_out are 1x1 convs (C, C, 1, 1); diffusers' are Linear (C, C)."""
    if w.shape[2:] != (1, 1):
        raise RDMError(f"expected a 1x1 convolution weight, got shape {tuple(w.shape)}")
    return w[:, :, 0, 0]


def select_unet_weights(state_dict: dict, ema: bool) -> dict[str, torch.Tensor]:
    """U-Net weights named relative to `model.diffusion_model.`, from the EMA copies when `ema`."""
    raw = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    if not raw:
        raise RDMError(f"the checkpoint holds no {UNET_PREFIX}* weights")
    ema_keys = {k for k in state_dict if k.startswith(EMA_PREFIX) and k not in SCHEDULE_KEYS}
    names = {k: ema_key(k) for k in raw}
    if len(set(names.values())) != len(names):
        raise RDMError("two U-Net weights collapse to the same EMA name; cannot tell the EMA copies apart")
    if not ema:
        return raw
    missing = sorted(k for k, e in names.items() if e not in state_dict)
    extra = sorted(ema_keys - set(names.values()))
    if missing or extra:
        raise RDMError(f"the checkpoint's EMA weights do not match the U-Net: missing EMA copies of {missing[:5]}, "
                       f"unknown EMA entries {extra[:5]}; convert with ema=False to use the raw weights")
    return {k: state_dict[e] for k, e in names.items()}


def rename_weights(weights: dict, module_map: dict, model: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
    """Rename CompVis weights onto `model`'s names; refuse unmapped, missing or misshaped entries."""
    expected = model.state_dict()
    out, unmapped = {}, []
    for key, value in weights.items():
        new = map_key(key, module_map)
        if new is None or new not in expected:
            unmapped.append(key)
            continue
        if value.dim() == 4 and expected[new].dim() == 2:
            value = conv1x1_to_linear(value)
        if tuple(value.shape) != tuple(expected[new].shape):
            raise RDMError(f"{what}: {key} has shape {tuple(value.shape)} but {new} needs {tuple(expected[new].shape)}")
        out[new] = value.to(torch.float32).contiguous()
    missing = sorted(set(expected) - set(out))
    if unmapped or missing:
        raise RDMError(f"{what}: checkpoint and config disagree; unexpected checkpoint keys {unmapped[:5]} "
                       f"({len(unmapped)}), diffusers weights left empty {missing[:5]} ({len(missing)})")
    return out


def load_weights(model: torch.nn.Module, weights: dict) -> torch.nn.Module:
    """Put `weights` (complete, checked by rename_weights) into a model built on the meta device."""
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def compvis_names(module_map: dict, model: torch.nn.Module, conv_attention: bool) -> dict[str, tuple[int, ...]]:
    """The inverse of `map_key`: CompVis parameter name -> shape, for every parameter of `model`, in module-map order.

    With `conv_attention`, the autoencoder's attention q/k/v/proj_out weights get CompVis's 1x1 conv shape.
    """
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = {}
    for cprefix, (dprefix, renames) in module_map.items():
        inverse = {v: k for k, v in renames.items()}
        for name, shape in params.items():
            if not name.startswith(dprefix + "."):
                continue
            inner, _, param = name[len(dprefix) + 1:].rpartition(".")
            inner = inverse.get(inner, inner)
            key = ".".join(x for x in (cprefix, inner, param) if x)
            if map_key(key, module_map) != name:
                continue  # a more specific module owns this parameter
            if conv_attention and renames is VAE_ATTENTION_NAMES and inner != "norm" and param == "weight":
                shape = shape + (1, 1)
            out[key] = shape
    if len(out) != len(params):
        raise RDMError(f"the key mapping does not cover the model: {len(params) - len(out)} parameters unnamed")
    return out


def compvis_layout(params: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every state_dict entry (shape, dtype) of a CompVis LatentDiffusion checkpoint of this config.

    DDPM schedule buffers, `model.diffusion_model.*`, the LitEma copies, then `first_stage_model.*`, as
    `ldm.models.diffusion.ddpm.LatentDiffusion.state_dict()` holds them (the golden checkpoint's exactly;
    within each part the order may differ). scripts/bench_convert.py writes a full-size one.
    """
    unet, vae, _ = build_models(params, device="meta")
    steps = (params.get("timesteps", 1000),)
    schedule = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2"]
    layout = {k: (steps, torch.float32) for k in schedule}
    unet_names = compvis_names(unet_module_map(params["unet_config"]["params"]), unet, conv_attention=False)
    layout.update({UNET_PREFIX + k: (shape, torch.float32) for k, shape in unet_names.items()})
    layout["model_ema.decay"], layout["model_ema.num_updates"] = ((), torch.float32), ((), torch.int32)
    layout.update({ema_key(k): (shape, torch.float32) for k, shape in unet_names.items()})
    vae_names = compvis_names(vae_module_map(params["first_stage_config"]["params"]["ddconfig"]), vae,
                              conv_attention=True)
    layout.update({VAE_PREFIX + k: (shape, torch.float32) for k, shape in vae_names.items()})
    return layout


# --- 3. The conversion ------------------------------------------------------------------------------

def file_sha256(path) -> str:
    """Hex sha256 of a file (rdm.db.store.sha256_file)."""
    from ...util.files import sha256_file

    return sha256_file(path)


def check_schedule(state_dict: dict, scheduler: DDIMScheduler, ckpt_path) -> None:
    """Refuse a config whose beta schedule differs from the `betas` buffer stored in the checkpoint."""
    betas = state_dict.get("betas")
    if betas is not None and not torch.allclose(betas.double(), scheduler.betas.double(), rtol=1e-4, atol=1e-8):
        raise RDMError(f"{ckpt_path}: the checkpoint's betas do not match the config's schedule "
                       "(linear_start/linear_end/timesteps); is it the right config.yaml?")


def check_unexpected(state_dict: dict) -> None:
    """Refuse top-level entries that are neither network weights nor known schedule/EMA bookkeeping."""
    known = (UNET_PREFIX, EMA_PREFIX, VAE_PREFIX)
    odd = sorted(k for k in state_dict if not k.startswith(known) and k not in SCHEDULE_KEYS)
    if odd:
        raise RDMError(f"the checkpoint holds entries the converter does not know: {odd[:5]} ({len(odd)})")


def _int_or_none(value) -> int | None:
    """Lightning's global_step when it is a plain int (it is bookkeeping, never trusted further)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def convert_compvis_checkpoint(ckpt_path, config_path, out_dir, clip: str = "ViT-L-14:openai",
                               clip_dim: int | None = None, ema: bool = True, k: int = 4, overwrite: bool = False,
                               checkpoint_sha256: str | None = None, origin: dict | None = None) -> Path:
    """Convert a CompVis RDM checkpoint into an rdm model folder at `out_dir`; return its path.

    The checkpoint's tensors are memory-mapped (rdm.models.convert.safe_load), so only the weights kept are
    read, once. `checkpoint_sha256` spares hashing a checkpoint whose digest is known (a verified
    download); `origin` (e.g. {"asset", "url"}) is added to the recorded provenance.
    """
    # 1. Read the config and build the diffusers architecture without allocating weights
    params = read_compvis_config(config_path)
    unet_params = params["unet_config"]["params"]
    context_dim = unet_params["context_dim"]
    if clip_dim is not None and clip_dim != context_dim:
        raise RDMError(f"the embedder {clip} gives {clip_dim}-d vectors but the U-Net expects "
                       f"context_dim {context_dim}")
    unet, vae, scheduler = build_models(params, device="meta")

    # 2. Read the tensors safely and check the checkpoint belongs to this config
    checkpoint = load_checkpoint(ckpt_path)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise RDMError(f"{ckpt_path} holds no state_dict")
    check_unexpected(state_dict)
    check_schedule(state_dict, scheduler, ckpt_path)

    # 3. Map the weights onto diffusers' names and fill the models
    dd = params["first_stage_config"]["params"]["ddconfig"]
    unet_weights = select_unet_weights(state_dict, ema)
    vae_weights = {key[len(VAE_PREFIX):]: v for key, v in state_dict.items()
                   if key.startswith(VAE_PREFIX) and not key.startswith(VAE_PREFIX + "loss.")}
    load_weights(unet, rename_weights(unet_weights, unet_module_map(unet_params), unet, "U-Net"))
    load_weights(vae, rename_weights(vae_weights, vae_module_map(dd), vae, "autoencoder"))

    # 4. Write the folder with its provenance
    config = RDMConfig(
        embedder={"model": clip, "dim": context_dim},
        embedding_dim=context_dim,
        resolution=native_resolution(params),
        latent_channels=unet_params["in_channels"],
        latent_scale_factor=float(params.get("scale_factor", 1.0)),
        k=k,
        query_token=True,
        unconditional="zeros",
        prediction_type=scheduler.config.prediction_type,
        sampling=SamplingDefaults().to_dict(),  # CompVis knn2img.py's: DDIM (the folder's), 50 steps, scale 5, eta 0
        source={"format": "compvis-latent-diffusion", "checkpoint": Path(ckpt_path).name,
                "checkpoint_sha256": checkpoint_sha256 or file_sha256(ckpt_path), "config": Path(config_path).name,
                "config_sha256": file_sha256(config_path), "ema": ema,
                "global_step": _int_or_none(checkpoint.get("global_step")), "converter": "rdm.models.convert.compvis",
                **(origin or {})},
    )
    return save_model_folder(out_dir, unet, vae, scheduler, config, overwrite=overwrite)

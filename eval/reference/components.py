"""Builders for the components of agentsd's embedded reference Stable Diffusion pipeline.

Everything is built offline from code: a word-level :class:`~transformers.CLIPTokenizer` (a
byte-level BPE whose merges spell out exactly the caption words of :mod:`eval.reference.shapes`, so every
caption word is one token while any other text still tokenizes, byte by byte), a small
:class:`~transformers.CLIPTextModel`, an :class:`~diffusers.AutoencoderKL` with downsampling factor
4 (64 px images -> 4 x 16 x 16 latents) and a :class:`~diffusers.UNet2DConditionModel` with the SD
block layout (cross-attention down/up blocks, a cross-attention mid block) whose top level works
on the 16 x 16 = 256 latent tokens.

:func:`refuse_shipped_model` keeps the training scripts from overwriting the shipped folder
(the folders of :data:`eval.reference.MODELS`) unless they are given :data:`OVERWRITE_FLAG`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from eval.reference import MODELS, shapes

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77
VAE_LOGVAR = -4.6  # posterior std exp(-2.3) ~= 0.1
#: the option the training scripts need to write into the shipped model's folder
OVERWRITE_FLAG = "--overwrite-shipped-model"


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word in ``words`` is a single token.

    Plain BPE training on the word list (each word counted once, ties broken by the pair's text),
    with CLIP's ``</w>`` end-of-word suffix. Applying the merges in order re-creates each word
    as one symbol.
    """
    segments = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words) if w}
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for seg in segments.values():
            counts.update(zip(seg, seg[1:]))
        if not counts:
            return merges
        best = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        for word, seg in segments.items():
            merged: list[str] = []
            i = 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    merged.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    merged.append(seg[i])
                    i += 1
            segments[word] = merged


def build_tokenizer(words: Iterable[str] | None = None, max_length: int = MAX_LENGTH) -> Any:
    """Build the CLIP tokenizer in memory (no download).

    The vocabulary holds the two special tokens, the 256 byte-level symbols, their ``</w>``
    variants, and one token per merge learned from ``words`` (default: the caption vocabulary of
    :mod:`eval.reference.shapes`). ``model_max_length`` is 77, like SD's tokenizer.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    merges = learn_merges(words if words is not None else shapes.vocabulary())
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
    for symbol in alphabet:
        vocab.setdefault(symbol + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


@dataclass
class ModelConfig:
    """Sizes of the reference pipeline's networks (the defaults are the shipped UNet model).

    ``denoiser`` is ``"unet"`` (:func:`build_unet`) or ``"dit"`` (:func:`build_dit`, a
    PixArt-layout transformer of ``dit_layers`` blocks, ``dit_width`` wide in ``dit_heads`` heads,
    on patches of ``dit_patch`` latent pixels). ``image_size`` is the side of the images in px
    (the latents are a quarter of it); ``text_positions`` the prompt length in tokens (PixArt's
    pipelines pad prompts to 120).
    """

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64)
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    extra: dict[str, Any] = field(default_factory=dict)
    denoiser: str = "unet"
    dit_width: int = 192
    dit_layers: int = 8
    dit_heads: int = 3
    dit_patch: int = 1
    image_size: int = 64
    text_positions: int = MAX_LENGTH

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        d = asdict(self)
        d["vae_channels"] = list(self.vae_channels)
        d["unet_channels"] = list(self.unet_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["vae_channels"] = tuple(d["vae_channels"])
        d["unet_channels"] = tuple(d["unet_channels"])
        return cls(**d)


def build_text_encoder(cfg: ModelConfig, vocab_size: int) -> Any:
    """A small randomly initialised :class:`~transformers.CLIPTextModel` (``text_positions``
    positions, 77 by default)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.text_positions,
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=cfg.text_hidden,
    )
    return CLIPTextModel(config)


def build_vae(cfg: ModelConfig, logvar: float = VAE_LOGVAR, norm_groups: int = 1) -> Any:
    """An :class:`~diffusers.AutoencoderKL` with ``2 ** (len(vae_channels) - 1)`` = 4x downsampling.

    The mid block has no attention (the images are flat shapes). ``norm_groups=1`` (one
    normalisation group) lets the decoder keep absolute colours, which per-channel groups
    normalise away (much slower to learn). The posterior log-variance starts as the constant
    ``logvar`` (std 0.1); :func:`freeze_vae_logvar` keeps it there during training.
    """
    import torch
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=norm_groups,
        sample_size=64,
        mid_block_add_attention=False,
    )
    # the posterior log-variance is the second half of quant_conv's output: make it a constant
    with torch.no_grad():
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(logvar)
    return vae


def freeze_vae_logvar(vae: Any) -> None:
    """Zero the gradients of the posterior log-variance rows of ``vae.quant_conv``.

    Trained with a learned variance, Adam swings the log-variance by several units per few
    steps (its tiny gradients are normalised away), and the decoder then sees mostly noise. A
    fixed std of 0.1 (with no KL term) trains a plain autoencoder with a little latent noise,
    which keeps the decoder tolerant to small errors of the diffusion model's latents.
    """

    def keep_mean_rows(grad: Any) -> Any:
        grad = grad.clone()
        grad[4:] = 0
        return grad

    vae.quant_conv.weight.register_hook(keep_mean_rows)
    vae.quant_conv.bias.register_hook(keep_mean_rows)


def build_unet(cfg: ModelConfig, sample_size: int = 16) -> Any:
    """A :class:`~diffusers.UNet2DConditionModel` with SD's block layout.

    The top level (``down_blocks.0`` / ``up_blocks[-1]``) is a cross-attention block whose
    transformer blocks self-attend over ``sample_size ** 2`` latent tokens; the lowest level is a
    plain ResNet block, as in SD 1.x.
    """
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,  # SD's (mis)naming: the number of heads
        norm_num_groups=32,
    )


def build_dit(cfg: ModelConfig, sample_size: int = 16) -> Any:
    """A :class:`~diffusers.PixArtTransformer2DModel` with PixArt's block layout (``ada_norm_single``
    blocks: self-attention over the ``(sample_size / dit_patch) ** 2`` image tokens, cross-attention
    to the text), sized by ``cfg``; it predicts the noise only (``out_channels=4``, no learned
    variance)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=cfg.dit_layers,
        patch_size=cfg.dit_patch,
        attention_head_dim=cfg.dit_width // cfg.dit_heads,
        num_attention_heads=cfg.dit_heads,
        caption_channels=cfg.text_hidden,
        cross_attention_dim=cfg.dit_width,
        in_channels=4,
        out_channels=4,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def build_denoiser(cfg: ModelConfig) -> Any:
    """The denoiser ``cfg`` names, for latents of a quarter of ``cfg.image_size``."""
    latent = cfg.image_size // 4
    return build_dit(cfg, latent) if cfg.denoiser == "dit" else build_unet(cfg, latent)


def scheduler_config() -> dict[str, Any]:
    """SD 1.x noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps, epsilon)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
    }


def build_train_scheduler() -> Any:
    """The :class:`~diffusers.DDPMScheduler` used for training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config(), clip_sample=False)


def build_inference_scheduler() -> Any:
    """The :class:`~diffusers.PNDMScheduler` (PLMS, ``skip_prk_steps``) saved with the pipeline."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(**scheduler_config(), skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def count_parameters(module: Any) -> int:
    """Number of parameters of a torch module."""
    return sum(p.numel() for p in module.parameters())


def shipped_folder(path: str | Path) -> Path | None:
    """The shipped reference model's folder (one of :data:`eval.reference.MODELS`) that ``path``
    is, or is inside; None otherwise."""
    resolved = Path(path).resolve()
    for folder in MODELS.values():
        shipped = folder.resolve()
        if resolved == shipped or shipped in resolved.parents:
            return shipped
    return None


def inside_shipped_model(path: str | Path) -> bool:
    """Whether ``path`` is a shipped model's folder (:data:`eval.reference.MODELS`) or inside one."""
    return shipped_folder(path) is not None


def refuse_shipped_model(out: str | Path, overwrite: bool) -> None:
    """End the run with a one-line error naming :data:`OVERWRITE_FLAG` if the output folder ``out``
    is the shipped model's (or inside it) and ``overwrite`` (that option) is not set."""
    shipped = shipped_folder(out)
    if not overwrite and shipped is not None:
        raise SystemExit(f"--out {out} would write into the shipped reference model ({shipped}); "
                         f"pass {OVERWRITE_FLAG} to overwrite it on purpose, or choose another folder")

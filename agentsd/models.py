"""The denoisers AgentSD patches, and where in each it hooks in.

| family | denoiser | patched blocks | patched layers |
|---|---|---|---|
| ``unet`` | ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL) | the ``BasicTransformerBlock`` s of the highest-resolution level with self-attention | ``attn1`` |
| ``pixart`` | ``PixArtTransformer2DModel`` (PixArt-α, PixArt-Σ) | its ``transformer_blocks`` (``BasicTransformerBlock``) | ``attn1`` |
| ``sd3`` | ``SD3Transformer2DModel`` (SD3, SD3.5) | its ``transformer_blocks`` (``JointTransformerBlock``) | ``attn`` (joint: the image tokens are reduced, the text tokens kept) and SD3.5's image-only ``attn2`` |

``merge_crossattn`` adds the cross-attention ``attn2`` of ``BasicTransformerBlock`` s, and
``merge_mlp`` the feed-forward ``ff`` of every patched block. A token of a patched block spans
``downsample`` latent pixels per side: the level's downsampling in a UNet, the patch size in a
transformer. Every family also has a recipe, the settings it runs by default (:data:`RECIPES`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.attention_processor import Attention

SUPPORTED = (
    "a diffusers pipeline, or its denoiser, of these families (also wrapped by torch.compile): "
    "UNet2DConditionModel (Stable Diffusion 1.x/2.x, SDXL, their img2img, inpaint and ControlNet "
    "pipelines), PixArtTransformer2DModel (PixArt-α, PixArt-Σ), SD3Transformer2DModel (SD3, SD3.5)"
)
#: The settings each family runs by default, over :class:`~agentsd.AgentSDConfig`'s defaults
#: (the official recipe, kept for SD's UNets). The transformers pool: on PixArt-Σ and SD3.5 it is
#: faster than the merge in both phases at every size measured, and on the reference DiT closer to
#: the unpatched images (docs/dit.md has the evidence); every block, 4x4 cells, the default phases.
RECIPES: dict[str, dict[str, Any]] = {"unet": {}, "pixart": {"reduction": "pool"}, "sd3": {"reduction": "pool"}}


class Family(NamedTuple):
    """How AgentSD finds its way into one kind of denoiser."""

    name: str
    cls: type
    #: the pipeline attribute that holds the denoiser
    attribute: str
    #: the forward argument that holds the latents ``(B, C, H, W)``
    sample: str


FAMILIES = (
    Family("unet", UNet2DConditionModel, "unet", "sample"),
    Family("pixart", PixArtTransformer2DModel, "transformer", "hidden_states"),
    Family("sd3", SD3Transformer2DModel, "transformer", "hidden_states"),
)


def denoiser_of(model: Any) -> tuple[torch.nn.Module, Family]:
    """The denoiser of ``model`` (a pipeline, or a denoiser; ``torch.compile`` wrappers are looked
    through) and its family.

    Raises:
        TypeError: for anything else, naming what is supported.
    """
    candidates = [model] + [getattr(model, attribute, None) for attribute in ("unet", "transformer")]
    for candidate in candidates:
        denoiser = getattr(candidate, "_orig_mod", candidate)
        for family in FAMILIES:
            if isinstance(denoiser, family.cls):
                return denoiser, family
    found = next((type(getattr(c, "_orig_mod", c)).__name__ for c in candidates[1:] if c is not None),
                 type(model).__name__)
    raise TypeError(f"agentsd supports {SUPPORTED}; got {found}")


def self_attention_layers(unet: Any, max_downsample: int | None = None) -> dict[str, tuple[Attention, int]]:
    """The self-attention modules (``attn1``) of a UNet at downsampling <= ``max_downsample``
    (None: the highest-resolution level that has self-attention).

    Returns ``{module name: (module, downsampling factor)}``.
    """
    unet, family = denoiser_of(unet)
    if family.name != "unet":
        raise TypeError(f"self_attention_layers takes a UNet, got {type(unet).__name__}")
    levels: list[tuple[str, torch.nn.Module, int]] = []
    downsample = 1
    for i, block in enumerate(unet.down_blocks):
        levels.append((f"down_blocks.{i}", block, downsample))
        if getattr(block, "downsamplers", None):
            downsample *= 2
    if unet.mid_block is not None:
        levels.append(("mid_block", unet.mid_block, downsample))
    for i, block in enumerate(unet.up_blocks):
        levels.append((f"up_blocks.{i}", block, downsample))
        if getattr(block, "upsamplers", None):
            downsample //= 2

    layers = {}
    for prefix, block, factor in levels:
        for name, module in block.named_modules():
            if name.endswith("attn1") and isinstance(module, Attention) and not module.is_cross_attention:
                layers[f"{prefix}.{name}"] = (module, factor)
    if max_downsample is None:
        max_downsample = min((f for _, f in layers.values()), default=1)
    return {name: layer for name, layer in layers.items() if layer[1] <= max_downsample}


def self_attentions(block: torch.nn.Module) -> tuple[str, ...]:
    """The names of a patched block's self-attention layers: ``attn1`` of a
    ``BasicTransformerBlock``; the joint ``attn`` of a ``JointTransformerBlock`` and its
    image-only ``attn2`` where it has one (SD3.5)."""
    if isinstance(block, JointTransformerBlock):
        return ("attn", "attn2") if getattr(block, "attn2", None) is not None else ("attn",)
    return ("attn1",)


def patched_blocks(denoiser: torch.nn.Module, family: Family, max_downsample: int | None,
                   skip_ends: int) -> dict[str, tuple[torch.nn.Module, int]]:
    """``{block name: (block, downsample)}`` of the blocks to patch, in order: those of the family
    (see the module docstring), less the first and last ``skip_ends``.

    Raises:
        ValueError: for a UNet level without self-attention, or a transformer given
            ``max_downsample``.
    """
    if family.name == "unet":
        layers = self_attention_layers(denoiser, max_downsample)
        if not layers:
            levels = sorted({f for _, f in self_attention_layers(denoiser, 2**30).values()})
            raise ValueError(
                f"this UNet has no self-attention at max_downsample={max_downsample}; its "
                f"self-attention is at downsampling {levels}"
                + (f" (use max_downsample={levels[0]} or leave it None)" if levels else "")
            )
        blocks = {}
        for name, (attn1, factor) in layers.items():
            parent = denoiser.get_submodule(name.rpartition(".")[0])
            if not isinstance(parent, BasicTransformerBlock) or parent.attn1 is not attn1:
                raise TypeError(f"{name} is not the attn1 of a transformer block; agentsd supports diffusers' "
                                f"BasicTransformerBlock (found {type(parent).__name__})")
            blocks[name.rpartition(".")[0]] = (parent, factor)
    else:
        if max_downsample is not None:
            raise ValueError(f"max_downsample chooses a UNet level; a {type(denoiser).__name__} attends at one "
                             "resolution (leave it None)")
        kind = BasicTransformerBlock if family.name == "pixart" else JointTransformerBlock
        patch = denoiser.config.patch_size
        blocks = {f"transformer_blocks.{i}": (block, patch) for i, block in enumerate(denoiser.transformer_blocks)
                  if isinstance(block, kind)}
    names = list(blocks)
    if skip_ends and 2 * skip_ends >= len(names):
        raise ValueError(f"skip_ends={skip_ends} leaves none of the {len(names)} blocks patched; use at most "
                         f"{(len(names) - 1) // 2}")
    kept = names[skip_ends:len(names) - skip_ends]
    return {name: blocks[name] for name in kept}

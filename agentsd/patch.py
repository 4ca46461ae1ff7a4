"""Applying and removing AgentSD on a diffusers pipeline or UNet.

The data path of a patched UNet, top to bottom:

1. :func:`apply_patch` finds the transformer blocks whose self-attention (``attn1``) is at the
   chosen resolution level and registers the hooks of :mod:`agentsd.hooks`: two PyTorch forward
   hooks on the UNet, and diffusers ``ModelHook`` s on each block and its layers.
2. Every UNet call, :class:`~agentsd.hooks.StepBegin` reads the timestep and opens the call's
   :class:`~agentsd.context.Step`: its phase, latent size and random key (:mod:`agentsd.phase`).
3. Every patched block, :class:`~agentsd.hooks.BlockHook` matches its input tokens
   (:mod:`agentsd.merge`) or pools them (:mod:`agentsd.pool`) and keeps the reductions with the
   call (:mod:`agentsd.reduce`, :mod:`agentsd.context`).
4. :class:`~agentsd.hooks.SelfAttentionHook` merges, runs (agent) attention on SDPA
   (:mod:`agentsd.attention`, :mod:`agentsd.agent_attention`) and unmerges.

No diffusers class, processor or module is replaced. Removal takes the hooks out, so the modules
are exactly as they were.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any, NoReturn

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from .config import UNSET, AgentSDConfig, PoolMode, Reduction
from .hooks import (
    BLOCK_HOOK, CROSS_ATTENTION_HOOK, FEED_FORWARD_HOOK, SELF_ATTENTION_HOOK, Argument, BlockHook,
    CrossAttentionHook, FeedForwardHook, Patch, SelfAttentionHook, StepBegin, StepEnd, register, unregister,
)
from .merge import mix32

logger = logging.getLogger(__name__)

_PATCH_ATTR = "_agentsd_patch"
#: Private key of the UNet config (saved in its ``config.json``) that holds stored settings.
CONFIG_KEY = "_agentsd_config"
SUPPORTED = (
    "a diffusers pipeline with a UNet2DConditionModel `unet` (Stable Diffusion 1.x/2.x, SDXL, "
    "img2img, inpaint, ControlNet, ...) or a bare UNet2DConditionModel, also wrapped by torch.compile"
)


def _unet_of(model: Any) -> tuple[UNet2DConditionModel, Any | None]:
    """The UNet of ``model`` and its pipeline (None for a bare UNet); ``torch.compile`` wrappers
    (``OptimizedModule``) are looked through."""
    pipeline = None
    unet = getattr(model, "_orig_mod", model)
    if not isinstance(unet, UNet2DConditionModel):
        pipeline = model
        unet = getattr(getattr(model, "unet", None), "_orig_mod", getattr(model, "unet", None))
    if isinstance(unet, UNet2DConditionModel):
        return unet, pipeline
    raise TypeError(f"agentsd supports {SUPPORTED}; got {type(model).__name__}")


def self_attention_layers(unet: Any, max_downsample: int | None = None) -> dict[str, tuple[Attention, int]]:
    """The self-attention modules (``attn1``) of ``unet`` at downsampling <= ``max_downsample``
    (None: the highest-resolution level that has self-attention).

    Returns ``{module name: (module, downsampling factor)}``.
    """
    unet, _ = _unet_of(unet)
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


def _attention_levels(unet: UNet2DConditionModel) -> list[int]:
    return sorted({f for _, f in self_attention_layers(unet, 2**30).values()})


def _transformer_blocks(
    unet: UNet2DConditionModel, layers: dict[str, tuple[Attention, int]]
) -> dict[str, tuple[torch.nn.Module, int]]:
    """The modules that own the given ``attn1`` layers (diffusers' ``BasicTransformerBlock``)."""
    blocks = {}
    for name, (attn1, factor) in layers.items():
        parent = unet.get_submodule(name.rpartition(".")[0])
        if getattr(parent, "attn1", None) is not attn1 or not hasattr(parent, "norm1"):
            raise TypeError(
                f"{name} is not the attn1 of a transformer block; agentsd supports diffusers' "
                f"BasicTransformerBlock (found {type(parent).__name__})"
            )
        blocks[name.rpartition(".")[0]] = (parent, factor)
    return blocks


def apply_patch(
    model: Any,
    ratio: float | None = UNSET,
    *,
    config: AgentSDConfig | None = None,
    agent_ratio: float = UNSET,
    sx: int = UNSET,
    sy: int = UNSET,
    agent_fraction: float = UNSET,
    reduction: Reduction = UNSET,
    pool_mode: PoolMode = UNSET,
    tome_ratio: float | None = UNSET,
    tome_sx: int = UNSET,
    tome_sy: int = UNSET,
    tome_reduction: Reduction | None = UNSET,
    k_scale2: float = UNSET,
    k_shortcut: float = UNSET,
    max_downsample: int | None = UNSET,
    attn_precision: str | None = UNSET,
    seed: int = UNSET,
    use_rand: bool = UNSET,
    merge_crossattn: bool = UNSET,
    merge_mlp: bool = UNSET,
    top_left_for_odd_batches: bool = UNSET,
    **unknown: NoReturn,
) -> Any:
    """Turn a diffusers pipeline or UNet into AgentSD.

    Every setting is taken, from the highest priority down, from: the keyword given here,
    ``config``, the settings stored with the model (:func:`store_config`, e.g. by
    ``scripts/train_dreambooth.py``: they are saved in the UNet's ``config.json``, so a pipeline
    reloaded with ``from_pretrained`` carries them), and the defaults of
    :class:`~agentsd.config.AgentSDConfig` (the official two-phase recipe). So
    ``apply_patch(pipe)`` on a model finetuned with AgentSD runs it as it was trained, and on any
    other model runs the defaults.

    Args:
        model: a diffusers pipeline with a ``UNet2DConditionModel`` ``unet``, or such a UNet; either
            may be wrapped by ``torch.compile``, and ``compile_repeated_blocks`` may have been
            called before or after.
        ratio: share of the tokens merged away before attention (with ``reduction="pool"``: share
            of the keys and values pooled away), in [0, 1); default None: 0.4 with ``"merge"``,
            0.75 with ``"pool"`` (keys and values pooled 2x2).
        config: settings to start from instead of the stored ones or the defaults, e.g.
            ``agentsd.load_config(lora_folder)`` for LoRA weights trained with AgentSD.
        agent_ratio: share of the tokens merged away to form the agents, in (0, 1); default 0.95
            (with 4x4 cells: one agent per cell). Unused with ``reduction="pool"``.
        sx: cell width of the agent phase (one dst token, or one pooled agent, per cell); default 4.
        sy: cell height of the agent phase; default 4.
        agent_fraction: share of the denoising steps that run the agent phase, in [0, 1]; the rest
            run the late (ToMe) phase; 1 means every step; default 0.4.
        reduction: ``"merge"`` (the official token matching, default) or ``"pool"`` (no matching:
            agents pooled per cell, keys and values pooled, every query kept).
        pool_mode: how ``"pool"`` makes one token of a cell: ``"mean"`` (default) or ``"nearest"``.
        tome_ratio: ``ratio`` of the late phase; default None (the same as ``ratio``).
        tome_sx: cell width of the late phase; default 2.
        tome_sy: cell height of the late phase; default 2.
        tome_reduction: ``reduction`` of the late phase; default None (the same as ``reduction``).
            ``"pool"`` makes the late phase plain attention on pooled keys and values (ToDo-like).
        k_scale2: the broadcast softmax scale is ``scale ** k_scale2``, > 0; default 0.3.
        k_shortcut: weight of the value shortcut ``k_shortcut * V``; default 0.075.
        max_downsample: patch the levels with at most this downsampling (1, 2, 4 or 8); default None:
            the highest-resolution level with self-attention (1 for SD 1.x/2.x, 2 for SDXL).
        attn_precision: ``"fp32"`` runs the attention in fp32 (SD 2.1 in fp16); default None.
        seed: seed of the random dst choice (the same seed and timestep give the same merges); default 0.
        use_rand: draw the dst token of every cell at random (False: its top-left token); default True.
            The draw is the same for every image of a batch and comes from ``seed`` and the
            timestep, so an image does not depend on the rest of its batch.
        top_left_for_odd_batches: the official code's rule, for reproducing it exactly: a batch
            of odd size takes the top-left token of every cell; default False.
        merge_crossattn: run the cross-attention of the patched blocks on the merged tokens too; default False.
        merge_mlp: run the feed-forward of the patched blocks on the merged tokens too; default False.

    Returns:
        ``model``, patched. A patch already there is replaced. If anything is wrong with the
        arguments, an error is raised and ``model`` is left untouched.

    Raises:
        TypeError: for a keyword that is not a setting (the message lists the valid ones), a
            setting of the wrong type, or a model that is not supported.
        ValueError: for a setting out of its range, or a level without self-attention.
    """
    if unknown:
        raise TypeError(f"apply_patch() got unknown keyword(s) {sorted(unknown)}; valid: {sorted(SETTINGS)}")
    given = {k: v for k, v in locals().items() if k in SETTINGS and v is not UNSET}
    unet, _ = _unet_of(model)
    if config is not None and not isinstance(config, AgentSDConfig):
        raise TypeError(f"config must be an AgentSDConfig, got {type(config).__name__}")
    if config is not None:
        base, source = config, {name: "config" for name in SETTINGS}
    else:
        stored = unet.config.get(CONFIG_KEY)
        base = stored_config(unet) or AgentSDConfig()
        source = {name: "stored with the model" for name in (stored or {}) if name in SETTINGS}
    config = dataclasses.replace(base, **given)
    source.update(dict.fromkeys(given, "given"))
    layers = self_attention_layers(unet, config.max_downsample)
    if not layers:
        levels = _attention_levels(unet)
        raise ValueError(
            f"this UNet has no self-attention at max_downsample={config.max_downsample}; its "
            f"self-attention is at downsampling {levels}"
            + (f" (use max_downsample={levels[0]} or leave it None)" if levels else "")
        )
    blocks = _transformer_blocks(unet, layers)
    remove_patch(unet)

    patch = Patch(config, Argument.of(unet, "sample"), Argument.of(unet, "timestep"))
    for index, (name, (block, factor)) in enumerate(blocks.items()):
        hook = BlockHook(patch, name, factor, salt=mix32(index + 0x9E3779B9))
        patch.blocks.append(hook)
        layers = [(name, hook, BLOCK_HOOK), (f"{name}.attn1", SelfAttentionHook(patch, f"{name}.attn1"),
                                              SELF_ATTENTION_HOOK)]
        if config.merge_crossattn and getattr(block, "attn2", None) is not None:
            layers.append((f"{name}.attn2", CrossAttentionHook(patch, f"{name}.attn2"), CROSS_ATTENTION_HOOK))
        if config.merge_mlp and getattr(block, "ff", None) is not None:
            layers.append((f"{name}.ff", FeedForwardHook(patch, f"{name}.ff"), FEED_FORWARD_HOOK))
        for module_name, layer_hook, hook_name in layers:
            if register(unet.get_submodule(module_name), layer_hook, hook_name):
                patch.new_registries.append(module_name)
            patch.hooked.append((module_name, hook_name))
    patch.handles = [
        unet.register_forward_pre_hook(StepBegin(patch), with_kwargs=True),
        unet.register_forward_hook(StepEnd(patch), always_call=True),
    ]
    setattr(unet, _PATCH_ATTR, patch)
    logger.info("AgentSD on %d transformer blocks at downsampling %s (%s): %s", len(blocks),
                sorted({f for _, f in blocks.values()}), ", ".join(blocks), _describe(config, source))
    return model


def _describe(config: AgentSDConfig, source: dict[str, str]) -> str:
    """The settings, each with where it came from: given, config, stored with the model, default."""
    groups: dict[str, list[str]] = {}
    for name in SETTINGS:
        groups.setdefault(source.get(name, "default"), []).append(f"{name}={getattr(config, name)!r}")
    return "; ".join(f"{where}: {', '.join(values)}" for where, values in groups.items())


#: The settings of :func:`apply_patch`: the fields of :class:`~agentsd.config.AgentSDConfig`.
SETTINGS = tuple(AgentSDConfig.__dataclass_fields__)


def remove_patch(model: Any) -> Any:
    """Undo :func:`apply_patch`: the hooks go, so the model is exactly as it was, with whatever
    processors were set on it before or since.

    Does nothing on a model that is not patched. Returns ``model``.
    """
    unet, _ = _unet_of(model)
    patch = unet.__dict__.pop(_PATCH_ATTR, None)
    if patch is None:
        return model
    for handle in patch.handles:
        handle.remove()
    for module_name, hook_name in reversed(patch.hooked):
        unregister(unet.get_submodule(module_name), hook_name, module_name in patch.new_registries)
    return model


def store_config(model: Any, config: AgentSDConfig) -> Any:
    """Store ``config`` with ``model`` (in its UNet's config): ``save_pretrained`` writes it,
    ``from_pretrained`` reads it back, and :func:`apply_patch` without settings uses it.

    Returns ``model``.
    """
    if not isinstance(config, AgentSDConfig):
        raise TypeError(f"config must be an AgentSDConfig, got {type(config).__name__}")
    unet, _ = _unet_of(model)
    unet.register_to_config(**{CONFIG_KEY: config.to_dict()})
    return model


def stored_config(model: Any) -> AgentSDConfig | None:
    """The settings stored with ``model`` by :func:`store_config`, or None."""
    unet, _ = _unet_of(model)
    data = unet.config.get(CONFIG_KEY)
    return AgentSDConfig.from_dict(data, source="the settings stored with the model") if data is not None else None


def is_patched(model: Any) -> bool:
    """Whether ``model`` (pipeline or UNet) carries an AgentSD patch."""
    unet, _ = _unet_of(model)
    return _PATCH_ATTR in unet.__dict__


def patch_config(model: Any) -> AgentSDConfig | None:
    """The settings of the patch on ``model``, or None when it is not patched."""
    unet, _ = _unet_of(model)
    patch = unet.__dict__.get(_PATCH_ATTR)
    return patch.config if patch is not None else None


@contextlib.contextmanager
def patched(model: Any, ratio: float | None = UNSET, **settings: Any) -> Iterator[Any]:
    """Context manager form: ``with agentsd.patched(pipe, ratio=0.4): pipe(...)``.

    Takes the arguments of :func:`apply_patch`. On exit, also after an error, the model is as it
    was on entry: unpatched, or with the patch it had then (its settings).
    """
    earlier = patch_config(model)
    apply_patch(model, ratio, **settings)
    try:
        yield model
    finally:
        remove_patch(model)
        if earlier is not None:
            apply_patch(model, config=earlier)

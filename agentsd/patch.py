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

from .config import UNSET, AgentSDConfig, PoolMode, Reduction
from .hooks import (
    BLOCK_HOOK, CROSS_ATTENTION_HOOK, FEED_FORWARD_HOOK, SELF_ATTENTION_HOOK, Argument, BlockHook,
    CrossAttentionHook, FeedForwardHook, Patch, SelfAttentionHook, StepBegin, StepEnd, register, unregister,
)
from .merge import mix32
from .models import RECIPES, SUPPORTED, Family, denoiser_of, patched_blocks, self_attention_layers, self_attentions

logger = logging.getLogger(__name__)

_PATCH_ATTR = "_agentsd_patch"
#: Private key of the denoiser's config (saved in its ``config.json``) that holds stored settings.
CONFIG_KEY = "_agentsd_config"


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
    skip_ends: int = UNSET,
    attn_precision: str | None = UNSET,
    seed: int = UNSET,
    use_rand: bool = UNSET,
    merge_crossattn: bool = UNSET,
    merge_mlp: bool = UNSET,
    top_left_for_odd_batches: bool = UNSET,
    **unknown: NoReturn,
) -> Any:
    """Turn a diffusers pipeline, or its denoiser, into AgentSD.

    Every setting is taken, from the highest priority down, from: the keyword given here,
    ``config``, the settings stored with the model (:func:`store_config`, e.g. by
    ``scripts/train_dreambooth.py``: they are saved in the denoiser's ``config.json``, so a
    pipeline reloaded with ``from_pretrained`` carries them), the recipe of the model's family
    (:data:`agentsd.models.RECIPES`; for SD's UNets, none) and the defaults of
    :class:`~agentsd.config.AgentSDConfig` (the official two-phase recipe). So ``apply_patch(pipe)``
    on a model finetuned with AgentSD runs it as it was trained, and on any other model runs its
    family's recipe. Every setting is logged with where it came from.

    Args:
        model: a diffusers pipeline of a supported family (SD 1.x/2.x and SDXL UNets and their
            img2img, inpaint and ControlNet pipelines; PixArt-α/Σ; SD3/SD3.5), or its denoiser;
            either may be wrapped by ``torch.compile``, and ``compile_repeated_blocks`` may have
            been called before or after.
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
            the highest-resolution level with self-attention (1 for SD 1.x/2.x, 2 for SDXL). UNets only.
        skip_ends: leave the first and the last ``skip_ends`` of the blocks it would patch unpatched;
            default 0 (a transformer's recipe may set it).
        attn_precision: ``"fp32"`` runs the attention in fp32 (SD 2.1 in fp16); default None.
        seed: seed of the random dst choice (the same seed and timestep give the same merges); default 0.
        use_rand: draw the dst token of every cell at random (False: its top-left token); default True.
            The draw is the same for every image of a batch and comes from ``seed`` and the
            timestep, so an image does not depend on the rest of its batch.
        top_left_for_odd_batches: the official code's rule, for reproducing it exactly: a batch
            of odd size takes the top-left token of every cell; default False.
        merge_crossattn: run the cross-attention of the patched blocks on the merged tokens too
            (not SD3, whose joint attention has none); default False.
        merge_mlp: run the feed-forward of the patched blocks on the merged tokens too; default False.

    Returns:
        ``model``, patched. A patch already there is replaced. If anything is wrong with the
        arguments, an error is raised and ``model`` is left untouched.

    Raises:
        TypeError: for a keyword that is not a setting (the message lists the valid ones), a
            setting of the wrong type, or a model that is not supported.
        ValueError: for a setting out of its range, a level without self-attention, or a setting
            the model's family does not have.
    """
    if unknown:
        raise TypeError(f"apply_patch() got unknown keyword(s) {sorted(unknown)}; valid: {sorted(SETTINGS)}")
    given = {k: v for k, v in locals().items() if k in SETTINGS and v is not UNSET}
    denoiser, family = denoiser_of(model)
    config, source = _resolve(denoiser, family, config, given)
    if config.merge_crossattn and family.name == "sd3":
        raise ValueError("merge_crossattn: SD3's blocks have no cross-attention (their joint attention keeps the "
                         "text tokens whole); leave it False")
    blocks = patched_blocks(denoiser, family, config.max_downsample, config.skip_ends)
    remove_patch(denoiser)

    patch = Patch(config, Argument.of(denoiser, family.sample), Argument.of(denoiser, "timestep"))
    hooked_before: dict[str, list[str]] = {}
    for index, (name, (block, factor)) in enumerate(blocks.items()):
        hook = BlockHook(patch, name, factor, salt=mix32(index + 0x9E3779B9))
        patch.blocks.append(hook)
        for module_name, layer_hook, hook_name in [(name, hook, BLOCK_HOOK), *_layer_hooks(patch, name, block)]:
            module = denoiser.get_submodule(module_name)
            inner = list(getattr(getattr(module, "_diffusers_hook", None), "hooks", {}))
            if inner and hook_name == SELF_ATTENTION_HOOK:
                hooked_before[module_name] = inner
            if register(module, layer_hook, hook_name):
                patch.new_registries.append(module_name)
            patch.hooked.append((module_name, hook_name))
    if hooked_before:
        logger.warning("the attention layers %s already have diffusers hooks (%s): AgentSD computes these attentions "
                       "itself in the agent phase, so those hooks do not run then; apply AgentSD before them to keep "
                       "them on", ", ".join(hooked_before), sorted({h for hooks in hooked_before.values() for h in hooks}))
    patch.handles = [
        denoiser.register_forward_pre_hook(StepBegin(patch), with_kwargs=True),
        denoiser.register_forward_hook(StepEnd(patch), always_call=True),
    ]
    setattr(denoiser, _PATCH_ATTR, patch)
    logger.info("AgentSD on %d %s blocks at downsampling %s (%s): %s", len(blocks), type(denoiser).__name__,
                sorted({f for _, f in blocks.values()}), ", ".join(blocks), _describe(config, source))
    return model


def resolve_config(model: Any, config: AgentSDConfig | None = None, **settings: Any) -> AgentSDConfig:
    """The settings ``apply_patch(model, config=config, **settings)`` would run, without patching:
    the keywords, then ``config``, the settings stored with the model, its family's recipe and the
    defaults.

    Raises:
        TypeError, ValueError: as :func:`apply_patch` does for these arguments.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; valid: {sorted(SETTINGS)}")
    denoiser, family = denoiser_of(model)
    return _resolve(denoiser, family, config, settings)[0]


def _resolve(denoiser: torch.nn.Module, family: Family, config: AgentSDConfig | None,
             given: dict[str, Any]) -> tuple[AgentSDConfig, dict[str, str]]:
    """The settings and where each came from (see :func:`resolve_config`)."""
    if config is not None and not isinstance(config, AgentSDConfig):
        raise TypeError(f"config must be an AgentSDConfig, got {type(config).__name__}")
    values = AgentSDConfig().to_dict()
    source = dict.fromkeys(RECIPES[family.name], f"recipe for {family.name}")
    values.update(RECIPES[family.name])
    if config is not None:
        values, source = config.to_dict(), dict.fromkeys(SETTINGS, "config")
    else:
        stored = _stored(denoiser)
        values.update(stored)
        source.update(dict.fromkeys(stored, "stored with the model"))
    values.update(given)
    source.update(dict.fromkeys(given, "given"))
    return AgentSDConfig(**values), source


def _layer_hooks(patch: Patch, name: str, block: torch.nn.Module) -> list[tuple[str, Any, str]]:
    """``(module name, hook, hook name)`` of the layers of one patched block."""
    config = patch.config
    layers = [(f"{name}.{a}", SelfAttentionHook(patch, f"{name}.{a}"), SELF_ATTENTION_HOOK)
              for a in self_attentions(block)]
    if config.merge_crossattn and getattr(block, "attn2", None) is not None:
        layers.append((f"{name}.attn2", CrossAttentionHook(patch, f"{name}.attn2"), CROSS_ATTENTION_HOOK))
    if config.merge_mlp and getattr(block, "ff", None) is not None:
        layers.append((f"{name}.ff", FeedForwardHook(patch, f"{name}.ff"), FEED_FORWARD_HOOK))
    return layers


def _stored(denoiser: torch.nn.Module) -> dict[str, Any]:
    """The settings stored with ``denoiser`` that this version knows (the others are ignored, with
    a warning naming them)."""
    data = denoiser.config.get(CONFIG_KEY)
    if data is None:
        return {}
    config = AgentSDConfig.from_dict(data, source="the settings stored with the model")
    return {name: getattr(config, name) for name in data if name in SETTINGS}


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
    denoiser, _ = denoiser_of(model)
    patch = denoiser.__dict__.pop(_PATCH_ATTR, None)
    if patch is None:
        return model
    for handle in patch.handles:
        handle.remove()
    for module_name, hook_name in reversed(patch.hooked):
        unregister(denoiser.get_submodule(module_name), hook_name, module_name in patch.new_registries)
    return model


def store_config(model: Any, config: AgentSDConfig) -> Any:
    """Store ``config`` with ``model`` (in its denoiser's config): ``save_pretrained`` writes it,
    ``from_pretrained`` reads it back, and :func:`apply_patch` without settings uses it.

    Returns ``model``.
    """
    if not isinstance(config, AgentSDConfig):
        raise TypeError(f"config must be an AgentSDConfig, got {type(config).__name__}")
    denoiser, _ = denoiser_of(model)
    denoiser.register_to_config(**{CONFIG_KEY: config.to_dict()})
    return model


def stored_config(model: Any) -> AgentSDConfig | None:
    """The settings stored with ``model`` by :func:`store_config`, or None."""
    denoiser, _ = denoiser_of(model)
    data = denoiser.config.get(CONFIG_KEY)
    return AgentSDConfig.from_dict(data, source="the settings stored with the model") if data is not None else None


def is_patched(model: Any) -> bool:
    """Whether ``model`` (a pipeline or its denoiser) carries an AgentSD patch."""
    denoiser, _ = denoiser_of(model)
    return _PATCH_ATTR in denoiser.__dict__


def patch_config(model: Any) -> AgentSDConfig | None:
    """The settings of the patch on ``model``, or None when it is not patched."""
    denoiser, _ = denoiser_of(model)
    patch = denoiser.__dict__.get(_PATCH_ATTR)
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

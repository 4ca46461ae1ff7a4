"""Applying and removing AgentSD on a diffusers pipeline or UNet.

The patch sets an :class:`~agentsd.processor.AgentSDAttnProcessor` on the self-attention of
the transformer blocks at the chosen resolution levels, wrapping whatever processor was there,
and adds one forward pre-hook on the UNet that records the latent size and selects the phase of
the step in progress. No diffusers class is replaced; removal restores the same processor
objects and leaves the modules as they were.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from .config import AgentSDConfig, Phase
from .processor import AgentSDAttnProcessor
from .schedule import denoising_progress

_STATE_ATTR = "_agentsd_state"
#: Private key of the UNet config (saved in its ``config.json``) that holds stored settings.
CONFIG_KEY = "_agentsd_config"
SUPPORTED = (
    "a diffusers pipeline with a UNet2DConditionModel `unet` (Stable Diffusion 1.x/2.x, SDXL, "
    "img2img, inpaint, ControlNet, ...) or a bare UNet2DConditionModel"
)


class PatchState:
    """What the processors of one patched UNet share: settings, latent size, current phase."""

    def __init__(self, config: AgentSDConfig, pipeline: Any | None) -> None:
        self.config = config
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.latent_size: tuple[int, int] | None = None
        self.phase: Phase | None = None
        self.generator = torch.Generator()
        self.processors: dict[str, tuple[Attention, Any]] = {}
        self.module_order: dict[str, list[str]] = {}
        self.hook: torch.utils.hooks.RemovableHandle | None = None

    def start_step(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> None:
        """Record the latent size and pick the phase for a UNet call at ``timestep``."""
        self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))
        pipeline = self._pipeline() if self._pipeline is not None else None
        progress = denoising_progress(
            timestep, getattr(pipeline, "scheduler", None), getattr(pipeline, "_num_timesteps", None)
        )
        self.phase = self.config.phase_at(progress)
        # Reseeded per call: the same input gives the same merge, in every run and process.
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        self.generator.manual_seed(hash((self.config.seed, round(t, 4))) & 0x7FFF_FFFF_FFFF)


def _unet_of(model: Any) -> tuple[UNet2DConditionModel, Any | None]:
    if isinstance(model, UNet2DConditionModel):
        return model, None
    unet = getattr(model, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        return unet, model
    raise TypeError(f"agentsd supports {SUPPORTED}; got {type(model).__name__}")


def self_attention_layers(unet: UNet2DConditionModel, max_downsample: int) -> dict[str, tuple[Attention, int]]:
    """The self-attention modules (``attn1``) of ``unet`` at downsampling <= ``max_downsample``.

    Returns ``{module name: (module, downsampling factor)}``.
    """
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
        if factor > max_downsample:
            continue
        for name, module in block.named_modules():
            if name.endswith("attn1") and isinstance(module, Attention) and not module.is_cross_attention:
                layers[f"{prefix}.{name}"] = (module, factor)
    return layers


def _attention_levels(unet: UNet2DConditionModel) -> list[int]:
    return sorted({f for _, f in self_attention_layers(unet, 2**30).values()})


def apply_patch(model: Any, ratio: float | None = None, *, config: AgentSDConfig | None = None, **settings: Any) -> Any:
    """Turn a diffusers pipeline or UNet into AgentSD.

    The settings are, from the highest priority down: the keywords given, ``config``, the
    settings stored with the model (:func:`store_config`, e.g. by ``scripts/train_dreambooth.py``:
    they are saved in the UNet's ``config.json``, so a pipeline reloaded with ``from_pretrained``
    carries them), and the defaults of :class:`~agentsd.config.AgentSDConfig` (ratio 0.4, the
    official two-phase recipe). So ``apply_patch(pipe)`` on a model finetuned with AgentSD runs it
    as it was trained, and on any other model runs the defaults.

    Args:
        model: a diffusers pipeline with a ``UNet2DConditionModel`` ``unet``, or such a UNet.
        ratio: share of the tokens merged away before attention, in [0, 1).
        config: settings to start from instead of the stored ones or the defaults, e.g.
            ``agentsd.load_config(lora_folder)`` for LoRA weights trained with AgentSD.
        **settings: any other field of :class:`~agentsd.config.AgentSDConfig`: ``agent_ratio``,
            ``sx``, ``sy``, ``agent_fraction``, ``tome_ratio``, ``tome_sx``, ``tome_sy``,
            ``k_scale2``, ``k_shortcut``, ``max_downsample`` (2 for SDXL, whose highest level has
            no attention), ``attn_precision`` ("fp32" for SD 2.1 in fp16) and ``seed``.

    Returns:
        ``model``, patched. A patch already there is replaced. If anything is wrong with the
        arguments, an error is raised and ``model`` is left untouched.
    """
    unet, pipeline = _unet_of(model)
    unknown = sorted(set(settings) - set(AgentSDConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(
            f"apply_patch() got unknown keyword(s) {unknown}; "
            f"valid: {sorted(AgentSDConfig.__dataclass_fields__)}"
        )
    if config is not None and not isinstance(config, AgentSDConfig):
        raise TypeError(f"config must be an AgentSDConfig, got {type(config).__name__}")
    if ratio is not None:
        settings["ratio"] = ratio
    base = config or stored_config(unet) or AgentSDConfig()
    config = dataclasses.replace(base, **settings)
    layers = self_attention_layers(unet, config.max_downsample)
    if not layers:
        raise ValueError(
            f"this UNet has no self-attention at max_downsample={config.max_downsample}; its "
            f"self-attention is at downsampling {_attention_levels(unet)} (SDXL needs max_downsample=2)"
        )
    remove_patch(unet)

    state = PatchState(config, pipeline)
    for name, (module, factor) in layers.items():
        state.module_order[name] = list(module._modules)
        state.processors[name] = (module, module.processor)
        module.set_processor(AgentSDAttnProcessor(module.processor, state, factor))

    def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        state.start_step(sample, timestep)

    state.hook = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    setattr(unet, _STATE_ATTR, state)
    return model


def remove_patch(model: Any) -> Any:
    """Undo :func:`apply_patch`: the original processor objects come back and the hook goes.

    Does nothing on a model that is not patched. Returns ``model``.
    """
    unet, _ = _unet_of(model)
    state: PatchState | None = unet.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    state.hook.remove()
    for name, (module, original) in state.processors.items():
        if isinstance(module.processor, AgentSDAttnProcessor) and module.processor.state is state:
            module.set_processor(original)
            order = state.module_order[name]
            if list(module._modules) != order:  # a processor that is an nn.Module comes back in place
                module._modules = type(module._modules)((key, module._modules[key]) for key in order)
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
    return AgentSDConfig.from_dict(data) if data is not None else None


def is_patched(model: Any) -> bool:
    """Whether ``model`` (pipeline or UNet) carries an AgentSD patch."""
    unet, _ = _unet_of(model)
    return _STATE_ATTR in unet.__dict__


def patch_config(model: Any) -> AgentSDConfig | None:
    """The settings of the patch on ``model``, or None when it is not patched."""
    unet, _ = _unet_of(model)
    state = unet.__dict__.get(_STATE_ATTR)
    return state.config if state is not None else None


@contextlib.contextmanager
def patched(
    model: Any, ratio: float | None = None, *, config: AgentSDConfig | None = None, **settings: Any
) -> Iterator[Any]:
    """Context manager form: ``with agentsd.patched(pipe, ratio=0.4): pipe(...)``.

    Takes the arguments of :func:`apply_patch`. Restores the model on exit, also after an error.
    """
    apply_patch(model, ratio, config=config, **settings)
    try:
        yield model
    finally:
        remove_patch(model)

"""ToDo, token downsampling (Smith, Saxena and Saha, arXiv 2402.13573), as a baseline.

The self-attention layers of the top level of the UNet (of every block of a PixArt or SD3
transformer, as AgentSD patches them) get their keys and values from a downsampled token grid: the hidden states that feed ``to_k`` and ``to_v`` are laid out on the
latent grid and shrunk by ``factor`` per axis with ``F.interpolate`` (``mode``, nearest by
default), so with factor 2 there are 4x fewer keys and values. The queries keep every token,
so the output has every token and nothing is unmerged. In SD3's joint attention the text tokens
are kept, as queries and as keys and values, beside the downsampled image keys and values. ToDo
is on for the first ``off_after``
of the noise levels, ``t >= (1 - off_after) * 1000``, and off for the rest, when details are drawn
(the rule AgentSD's phase follows).

Defaults: factor 2, nearest, the top level only, as in the authors' code
(ethansmith2000/ImprovedTokenMerge); off after 80 % of the steps, the end of the 60-80 %
recommended by the token-downsampling port for stable-diffusion-webui that follows it (the
authors' own code keeps it on to the last step, ``off_after=1``).

A forward pre-hook on the denoiser records the latent size and whether ToDo is on for this
call, from the call's timestep (:func:`agentsd.timestep_value`). :func:`remove_todo` puts back the processor
objects it replaced, so the model is the original again, bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

import agentsd
from agentsd.attention import is_joint, text_heads
from agentsd.config import NUM_TRAIN_TIMESTEPS
from agentsd.hooks import Argument
from agentsd.models import denoiser_of, patched_blocks, self_attentions

#: ``F.interpolate`` modes that shrink a grid.
MODES = ("nearest", "nearest-exact", "area", "bilinear", "bicubic")


@dataclass(frozen=True)
class ToDoSettings:
    """ToDo's settings: ``factor`` (per axis, >= 1), ``mode`` (``F.interpolate``), ``off_after``
    (share of the steps with ToDo on, in (0, 1]; 1 = every step) and ``max_downsample`` (the
    deepest level patched, as a downsampling factor; None: the highest level with attention)."""

    factor: float = 2.0
    mode: str = "nearest"
    off_after: float = 0.8
    max_downsample: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.factor, (int, float)) or not self.factor >= 1:
            raise ValueError(f"ToDo factor (--todo-factor) must be a number >= 1, got {self.factor!r}")
        if self.mode not in MODES:
            raise ValueError(f"ToDo mode (--todo-mode) must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not 0 < self.off_after <= 1:
            raise ValueError(f"ToDo off_after (--todo-off-after) must be in (0, 1], got {self.off_after!r}")
        md = self.max_downsample
        if md is not None and (not isinstance(md, int) or md < 1 or md & (md - 1)):
            raise ValueError(f"ToDo max_downsample (--todo-max-downsample) must be None or a power of two >= 1, "
                             f"got {md!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ToDoState:
    """What the hook tells the processors of one patched denoiser: the latent size and whether
    ToDo is on for the call in progress."""

    def __init__(self, settings: ToDoSettings, sample: Argument, timestep: Argument) -> None:
        self.settings = settings
        self.sample, self.timestep = sample, timestep
        self.latent_size: tuple[int, int] | None = None
        self.on = False

    @torch.compiler.disable
    def __call__(self, denoiser: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """The denoiser's forward pre-hook."""
        sample, timestep = self.sample.get(args, kwargs), self.timestep.get(args, kwargs)
        self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))
        off_after = self.settings.off_after
        t = agentsd.timestep_value(timestep)
        self.on = off_after == 1 or t >= (1 - off_after) * NUM_TRAIN_TIMESTEPS


class ToDoAttnProcessor:
    """Self-attention with keys and values from the downsampled token grid; any call it does not
    change (ToDo off, cross-attention, a mask, a 4-d input, a grid that does not fit) goes to
    the processor it replaced."""

    def __init__(self, state: ToDoState, original: Any, downsample: int) -> None:
        self.state, self.original, self.downsample = state, original, downsample

    def grid(self, tokens: int) -> tuple[int, int] | None:
        if self.state.latent_size is None:
            return None
        h, w = (math.ceil(s / self.downsample) for s in self.state.latent_size)
        return (h, w) if h * w == tokens else None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> Any:
        grid = self.grid(hidden_states.shape[1]) if hidden_states.ndim == 3 else None
        joint = is_joint(attn, encoder_hidden_states)
        plain = (not self.state.on or grid is None or (encoder_hidden_states is not None and not joint)
                 or attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None)
        if plain:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        s = self.state.settings
        (h, w), (b, _, c) = grid, hidden_states.shape
        small = (max(1, int(h / s.factor)), max(1, int(w / s.factor)))
        kv = hidden_states.transpose(1, 2).reshape(b, c, h, w)
        kv = F.interpolate(kv, size=small, mode=s.mode).flatten(2).transpose(1, 2)
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):  # fuse_qkv_projections
            wq, wk, wv = attn.to_qkv.weight.chunk(3)
            bq, bk, bv = attn.to_qkv.bias.chunk(3) if attn.to_qkv.bias is not None else (None,) * 3
            query, key, value = F.linear(hidden_states, wq, bq), F.linear(kv, wk, bk), F.linear(kv, wv, bv)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(kv), attn.to_v(kv)
        heads = attn.heads
        query, key, value = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        n = query.shape[2]
        if joint:  # SD3: every text token, as a query and as a key and value
            text = text_heads(attn, encoder_hidden_states)
            query, key, value = (torch.cat([a, t], dim=2) for a, t in zip((query, key, value), text))
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale).transpose(1, 2).flatten(2)
        image = attn.to_out[1](attn.to_out[0](out[:, :n].to(query.dtype)))
        if joint:
            text_out = out[:, n:].to(query.dtype)
            return image, text_out if attn.context_pre_only else attn.to_add_out(text_out)
        if attn.residual_connection:
            image = image + hidden_states
        return image / attn.rescale_output_factor



def self_attention_modules(denoiser: torch.nn.Module, max_downsample: int | None = None) -> dict[str, tuple[Any, int]]:
    """``{name: (attention module, downsample)}``: the self-attention layers AgentSD patches (the
    UNet's level at ``max_downsample``, every block of a transformer)."""
    denoiser, family = denoiser_of(denoiser)
    layers = {}
    for name, (block, downsample) in patched_blocks(denoiser, family, max_downsample, 0).items():
        for part in self_attentions(block):
            layers[f"{name}.{part}"] = (getattr(block, part), downsample)
    return layers


class ToDoPatch:
    """A ToDo patch on one denoiser: its hook, and the processors it replaced (for removal)."""

    def __init__(self, denoiser: torch.nn.Module, settings: ToDoSettings) -> None:
        _, family = denoiser_of(denoiser)
        self.state = state = ToDoState(settings, Argument.of(denoiser, family.sample), Argument.of(denoiser, "timestep"))
        md = settings.max_downsample if family.name == "unet" else None
        self.originals: dict[str, Any] = {}
        for name, (attn, downsample) in self_attention_modules(denoiser, md).items():
            self.originals[name] = attn.processor
            attn.set_processor(ToDoAttnProcessor(state, attn.processor, downsample))
        self.hook = denoiser.register_forward_pre_hook(state, with_kwargs=True)

    def remove(self, denoiser: torch.nn.Module) -> None:
        self.hook.remove()
        for name, processor in self.originals.items():
            denoiser.get_submodule(name).set_processor(processor)


def apply_todo(model: Any, settings: ToDoSettings | None = None, **changes: Any) -> Any:
    """ToDo on a diffusers pipeline or its denoiser (a UNet, a PixArt or SD3 transformer).
    ``changes`` are fields of :class:`ToDoSettings`; a patch already there is replaced. Returns
    ``model``."""
    settings = ToDoSettings(**{**(settings or ToDoSettings()).to_dict(), **changes})
    denoiser, _ = denoiser_of(model)
    remove_todo(model)
    denoiser._todo_patch = ToDoPatch(denoiser, settings)
    return model


def remove_todo(model: Any) -> Any:
    """Take ToDo off ``model`` (nothing happens if it has none): the hook goes, the replaced
    processor objects come back."""
    denoiser, _ = denoiser_of(model)
    patch = denoiser.__dict__.pop("_todo_patch", None)
    if patch is not None:
        patch.remove(denoiser)
    return model

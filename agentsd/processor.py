"""The AgentSD attention processors for the attention layers of a patched transformer block.

The reductions come from the block's :class:`~agentsd.state.BlockState`, where its
:class:`~agentsd.hooks.MatchHook` left them. Whenever the block has no reductions for this forward
(a phase that changes nothing, a level or input that does not fit, a mask), the processor it
wraps, its *base*, runs unchanged.

A wrapper exposes the call signature of its base, so that diffusers hands every
``cross_attention_kwargs`` entry that the base accepts through to it. :func:`wrap` puts a wrapper
on an attention module; :class:`~agentsd.hooks.StepHook` calls it again when diffusers has set
another processor since (attention slicing, fused projections, IP-Adapter, ...), so that the new
processor becomes the base and the patch stays on.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .agent_attention import agent_attention

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from .state import BlockMerges, BlockState

logger = logging.getLogger(__name__)


class _WrappingProcessor:
    """A processor that wraps the one it replaces: it runs :meth:`_run` on the block's reductions
    when they apply to this call (:meth:`_applies`), and the wrapped processor otherwise."""

    #: what the wrapper does, for messages
    role = ""
    #: whether the wrapper computes the attention itself when it reduces (else its base does)
    computes_attention = False

    def __init__(self, base: Any = None, block: "BlockState | None" = None) -> None:
        # diffusers rebuilds processors as ``type(processor)()`` (load_ip_adapter, unload_ip_adapter):
        # with no arguments this is a plain processor until StepHook wraps it for its block
        if base is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            base = AttnProcessor2_0()
        self.base = base
        self.block = block
        #: the attention module's children before patching (a processor that is an nn.Module
        #: becomes a child; removal puts it back in its place)
        self.module_order: list[str] = []

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if temb is not None:  # passed on only when given: not every processor takes it
            kwargs["temb"] = temb
        merges = self.block.merges if self.block is not None else None
        if merges is not None:
            reason = self._unsupported(attn, hidden_states, merges, encoder_hidden_states, attention_mask)
            if reason is None:
                return self._run(attn, hidden_states, merges, encoder_hidden_states, attention_mask, kwargs)
            if reason:
                self.block.state.note_fallback(f"{self.block.name}: {reason}")
        return self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, **kwargs)

    def _unsupported(self, attn: "Attention", hidden_states: torch.Tensor, merges: "BlockMerges",
                     encoder_hidden_states: Any, attention_mask: Any) -> str | None:
        """None when the reductions apply to this call; otherwise why not ("" when that is normal)."""
        if hidden_states.ndim != 3 or hidden_states.shape[1] != merges.num_tokens:
            return f"its {self.role} got {tuple(hidden_states.shape)} hidden states, not {merges.num_tokens} tokens"
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            return f"its {self.role} has a spatial norm, group norm or residual connection"
        return None

    def _run(self, attn: "Attention", hidden_states: torch.Tensor, merges: "BlockMerges",
             encoder_hidden_states: Any, attention_mask: Any, kwargs: dict) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        # diffusers names a processor in its errors (e.g. set_default_attn_processor): say what to do
        return (f"{type(self).__name__}(base={self.base!r}) (an AgentSD patch, which stays on top of any "
                "processor set with set_attn_processor; call agentsd.remove_patch(pipe) first to change "
                "the processors without it)")

    def __reduce__(self) -> tuple:
        # the class may be a subclass made for the base's signature (see _with_signature)
        return _rebuild, (type(self).__dict__.get("plain_class", type(self)), self.__dict__)


class AgentSDAttnProcessor(_WrappingProcessor):
    """Self-attention (attn1) on reduced tokens: agent attention, or plain attention when the step
    has no agents; the output goes back to every position.

    Args:
        base: the processor that was set on this attention module before patching.
        block: the state of the transformer block this attention belongs to.
    """

    role = "self-attention"
    computes_attention = True

    def _unsupported(self, attn: "Attention", hidden_states: torch.Tensor, merges: "BlockMerges",
                     encoder_hidden_states: Any, attention_mask: Any) -> str | None:
        if attention_mask is not None:
            return "its self-attention got an attention mask"
        if encoder_hidden_states is not None:
            return "its self-attention got encoder hidden states"
        return super()._unsupported(attn, hidden_states, merges, encoder_hidden_states, attention_mask)

    def _run(self, attn: "Attention", hidden_states: torch.Tensor, merges: "BlockMerges",
             encoder_hidden_states: Any, attention_mask: Any, kwargs: dict) -> torch.Tensor:
        tokens, kv = merges.tokens, merges.kv
        x = hidden_states if tokens is None else tokens.merge(hidden_states)
        x_kv = x if kv is None else kv.merge(x)
        # agents: the stronger merge of the same match, or the pooled cells, of the same (normed)
        # input, through to_q
        agents_in = merges.agents.merge(hidden_states) if merges.agents is not None else None
        q, k, v, agents = _project(attn, self.base, x, x_kv, agents_in)
        b, m, _ = x.shape
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], heads, -1).transpose(1, 2)

        q, k, v_heads = split(q), split(k), split(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        dtype = q.dtype
        config = self.block.state.config
        if config.attn_precision == "fp32":
            q, k, v_heads = q.float(), k.float(), v_heads.float()

        if agents is not None:
            agents = split(agents)
            if attn.norm_q is not None:
                agents = attn.norm_q(agents)
            out = agent_attention(
                q, k, v_heads, agents.to(q.dtype), scale=attn.scale, agent_scale=attn.scale ** config.k_scale2,
                shortcut=config.k_shortcut if kv is None else 0.0,
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v_heads, scale=attn.scale)

        out = out.transpose(1, 2).reshape(b, m, -1)
        if agents is not None and kv is not None:  # the official shortcut on the values at every query
            out = kv.add_unmerged(out, v.to(out.dtype), config.k_shortcut)
        out = attn.to_out[1](attn.to_out[0](out.to(dtype)))
        out = out if tokens is None else tokens.unmerge(out)
        return out if attn.rescale_output_factor == 1 else out / attn.rescale_output_factor


def _project(attn: "Attention", base: Any, x: torch.Tensor, x_kv: torch.Tensor,
             agents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries of ``x``, keys and values of ``x_kv`` and queries of ``agents`` (flat heads).

    When the projections are fused (the base is a fused processor and ``to_qkv`` exists) and the
    keys and values come from the queries' tokens, one matmul of ``to_qkv`` projects the tokens
    and the agents together.
    """
    m = x.shape[1]
    if x_kv is x and getattr(attn, "to_qkv", None) is not None and "Fused" in type(base).__name__:
        rows = x if agents is None else torch.cat([x, agents], dim=1)
        q, k, v = attn.to_qkv(rows).chunk(3, dim=-1)
        return q[:, :m], k[:, :m], v[:, :m], None if agents is None else q[:, m:]
    q, k, v = attn.to_q(x), attn.to_k(x_kv), attn.to_v(x_kv)
    return q, k, v, None if agents is None else attn.to_q(agents)


class MergedCrossAttnProcessor(_WrappingProcessor):
    """Cross-attention (attn2) on the merged tokens (``merge_crossattn``): the wrapped processor
    runs on them, and its output is unmerged to every position.

    Args:
        base: the processor that was set on this attention module before patching.
        block: the state of the transformer block this attention belongs to.
    """

    role = "cross-attention"

    def _unsupported(self, attn: "Attention", hidden_states: torch.Tensor, merges: "BlockMerges",
                     encoder_hidden_states: Any, attention_mask: Any) -> str | None:
        if merges.tokens is None:  # a phase that merges no tokens: nothing to do here
            return ""
        return super()._unsupported(attn, hidden_states, merges, encoder_hidden_states, attention_mask)

    def _run(self, attn: "Attention", hidden_states: torch.Tensor, merges: "BlockMerges",
             encoder_hidden_states: Any, attention_mask: Any, kwargs: dict) -> torch.Tensor:
        tokens = merges.tokens
        out = self.base(attn, tokens.merge(hidden_states), encoder_hidden_states=encoder_hidden_states,
                        attention_mask=attention_mask, **kwargs)
        return tokens.unmerge(out)


# ----------------------------------------------------------------------------- wrapping

_OWN_PARAMETERS = ("attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb")


@functools.lru_cache(maxsize=None)
def _subclass(cls: type, extra: tuple[str, ...]) -> type:
    """``cls`` with a ``__call__`` whose signature also names ``extra`` keywords."""

    def __call__(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return cls.__call__(self, *args, **kwargs)

    own = inspect.signature(cls.__call__)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in extra]
    params.append(own.parameters["kwargs"])
    __call__.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    return type(cls.__name__, (cls,), {"__call__": __call__, "plain_class": cls, "__module__": cls.__module__})


def _with_signature(cls: type, base: Any) -> type:
    """The wrapper class for ``base``: ``cls`` itself, or a subclass whose call signature also
    names every keyword that ``base`` accepts by name (diffusers passes on only those)."""
    try:
        names = inspect.signature(base.__call__ if not inspect.isfunction(base) else base).parameters
    except (TypeError, ValueError):
        return cls
    extra = tuple(n for n, p in names.items() if n not in _OWN_PARAMETERS and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
    return _subclass(cls, extra) if extra else cls


def _rebuild(cls: type, state: dict[str, Any]) -> _WrappingProcessor:
    new = object.__new__(_with_signature(cls, state["base"]))
    new.__dict__.update(state)
    return new


def unwrap(processor: Any) -> Any:
    """The processor under any AgentSD wrappers."""
    while isinstance(processor, _WrappingProcessor):
        processor = processor.base
    return processor


def wrap(attn: "Attention", cls: type, block: "BlockState") -> None:
    """Put a ``cls`` wrapper of ``block`` around the processor of ``attn``, unless one is there or
    the processor cannot run on merged tokens (IP-Adapter's masks and scales need every token)."""
    current = attn.processor
    if isinstance(current, cls) and current.block is block:
        return
    base = unwrap(current)
    if not cls.computes_attention and type(base).__name__.startswith("IPAdapter"):
        if base is not current:
            restore(attn)
        reason = f"{block.name}: merge_crossattn leaves its IP-Adapter cross-attention unmerged"
        if reason not in block.state.reported:
            block.state.reported.add(reason)
            logger.warning("%s (its masks and scale apply to every token)", reason)
        return
    wrapper = _with_signature(cls, base)(base, block)
    wrapper.module_order = list(attn._modules)
    attn.set_processor(wrapper)
    custom = f"custom processor {type(base).__name__}"
    if cls.computes_attention and not isinstance(base, _standard_processors()) and custom not in block.state.reported:
        block.state.reported.add(custom)
        logger.warning("%s: the processor %s is not one of diffusers' standard attention processors; AgentSD "
                       "computes this attention itself when it reduces tokens, and %s runs only when it does "
                       "not", block.name, type(base).__name__, type(base).__name__)
    else:
        logger.debug("%s: AgentSD wraps %s", block.name, type(base).__name__)


@functools.lru_cache(maxsize=1)
def _standard_processors() -> tuple[type, ...]:
    """diffusers' processors that compute plain attention (what AgentSD replaces faithfully)."""
    from diffusers.models import attention_processor as ap

    names = ("AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "XFormersAttnProcessor",
             "FusedAttnProcessor2_0", "AttnProcessorNPU", "XLAFlashAttnProcessor2_0")
    return tuple(getattr(ap, name) for name in names if hasattr(ap, name))


def restore(attn: "Attention") -> None:
    """Put back the processor under the AgentSD wrapper of ``attn``, in its place among the
    module's children; a processor set after the wrapper stays."""
    wrapper = attn.processor
    if not isinstance(wrapper, _WrappingProcessor):
        return
    attn.set_processor(unwrap(wrapper))
    order = wrapper.module_order
    if list(attn._modules) != order and set(attn._modules) == set(order):
        attn._modules = type(attn._modules)((key, attn._modules[key]) for key in order)

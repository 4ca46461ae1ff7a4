"""The hooks of an AgentSD patch, from the denoiser call down to each patched layer.

- :class:`StepBegin` and :class:`StepEnd`, PyTorch forward hooks on the denoiser, open
  and close each call: the phase from the call's timestep (:mod:`agentsd.phase`), the latent size
  and the call's random key go into a :class:`~agentsd.context.Step` on the calling thread's stack,
  and the reasons noted during the call are logged once per patch. PyTorch runs a module's own
  hooks outside ``torch.compile``'s graph, so this one host-side decision per call never breaks a
  compiled model; they are removed by their handles.
- :class:`BlockHook`, a diffusers ``ModelHook`` on each patched transformer block, matches (or
  pools) the block input, before ``norm1`` as the official code does, and keeps the reductions in
  a :class:`~agentsd.context.BlockCall` around the block's own forward.
- :class:`SelfAttentionHook` on the block's ``attn1`` (SD3: its joint ``attn`` and ``attn2``) runs
  attention on the reduced tokens;
  :class:`CrossAttentionHook` (``merge_crossattn``) and :class:`FeedForwardHook` (``merge_mlp``) run
  ``attn2`` and the feed-forward on the merged tokens. Each calls the module's own forward, with
  the processor the user set, whenever it does not reduce.

The ``ModelHook`` s are registered in each module's diffusers ``HookRegistry`` under the names in
:data:`HOOK_NAMES`. No processor, class or module is replaced; removal takes the named hooks out.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, NamedTuple

import torch
from diffusers.hooks import HookRegistry, ModelHook

from . import context
from .attention import computes_plain_attention, is_joint, reduced_attention, unsupported
from .config import AgentSDConfig
from .context import BlockCall, Step
from .merge import mix32
from .phase import timestep_value
from .reduce import block_reductions

logger = logging.getLogger(__name__)

BLOCK_HOOK = "agentsd.block"
SELF_ATTENTION_HOOK = "agentsd.self_attention"
CROSS_ATTENTION_HOOK = "agentsd.cross_attention"
FEED_FORWARD_HOOK = "agentsd.feed_forward"
#: The names of AgentSD's hooks in diffusers' ``HookRegistry``.
HOOK_NAMES = (BLOCK_HOOK, SELF_ATTENTION_HOOK, CROSS_ATTENTION_HOOK, FEED_FORWARD_HOOK)


class Argument(NamedTuple):
    """Where a forward takes one argument: its name and its position."""

    name: str
    index: int

    @classmethod
    def of(cls, module: torch.nn.Module, name: str) -> "Argument":
        params = list(inspect.signature(type(module).forward).parameters)[1:]  # without self
        return cls(name, params.index(name))

    def get(self, args: tuple, kwargs: dict) -> Any:
        return args[self.index] if len(args) > self.index else kwargs.get(self.name)


class Patch:
    """One AgentSD patch on one denoiser: its settings, what it hooked, what it has logged.

    Args:
        config: the settings.
        sample: the denoiser's argument that holds the latents ``(B, C, H, W)``.
        timestep: the denoiser's timestep argument.
    """

    def __init__(self, config: AgentSDConfig, sample: Argument, timestep: Argument) -> None:
        self.config = config
        self.sample = sample
        self.timestep = timestep
        self.blocks: list[BlockHook] = []
        #: (module name, hook name) of every ModelHook, and the modules whose registry AgentSD made
        self.hooked: list[tuple[str, str]] = []
        self.new_registries: list[str] = []
        self.handles: list[Any] = []
        self.device: torch.device | None = None
        #: the reasons already logged (each once per patch)
        self.reported: set[str] = set()

    def begin(self, args: tuple, kwargs: dict) -> Step:
        """The :class:`Step` of a denoiser call."""
        sample = self.sample.get(args, kwargs)
        t = timestep_value(self.timestep.get(args, kwargs))
        cfg = self.config
        phase = cfg.phase_at(t)
        agent = phase is cfg.agent_phase
        if sample.device != self.device:  # the blocks' keys follow the model to its device
            for block in self.blocks:
                block.salt = block.salt.to(sample.device)
            self.device = sample.device
        # the same seed and timestep give the same merges, in every run, process and on every device
        key = torch.full((), mix32(mix32(cfg.seed) ^ round(t * 16)), dtype=torch.long, device=sample.device)
        size = (int(sample.shape[-2]), int(sample.shape[-1]))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("call at t=%g: %s, latent %dx%d", t, phase, *size)
        return Step(self, agent, size, key, set())

    def report(self, notes: set[str]) -> None:
        """Log each note that this patch has not logged before."""
        for note in sorted(notes - self.reported):
            logger.warning("AgentSD: %s", note)
        self.reported |= notes


class StepBegin:
    """Forward pre-hook of the denoiser: pushes the call's :class:`Step`."""

    def __init__(self, patch: Patch) -> None:
        self.patch = patch

    @torch.compiler.disable
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        context.frames().append(self.patch.begin(args, kwargs))


class StepEnd:
    """Forward hook of the denoiser (also run after an error): pops the call's :class:`Step` and
    logs what it noted."""

    def __init__(self, patch: Patch) -> None:
        self.patch = patch

    @torch.compiler.disable
    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        stack = context.frames()
        while stack:
            frame = stack.pop()
            if type(frame) is Step and frame.owner is self.patch:
                if frame.notes:
                    self.patch.report(frame.notes)
                return


class BlockHook(ModelHook):
    """On a patched transformer block: the reductions of each forward, kept with the call.

    Args:
        patch: the patch.
        name: the block's name in the denoiser, for messages.
        downsample: how many latent pixels one token of this block spans per side.
        salt: what makes this block's random dst differ from the other blocks'.
    """

    def __init__(self, patch: Patch, name: str, downsample: int, salt: int) -> None:
        super().__init__()
        self.patch = patch
        self.name = name
        self.downsample = downsample
        # a tensor, not an int: compiled blocks then share one graph
        self.salt = torch.tensor(salt, dtype=torch.long)

    def new_forward(self, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        step = context.current()
        if type(step) is not Step or step.owner is not self.patch or step.phase.is_identity:
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        h, w = (math.ceil(s / self.downsample) for s in step.size)
        if x.ndim != 3 or h * w != x.shape[1]:
            step.notes.add(f"{self.name}: its {tuple(x.shape)} input is not the token grid of a "
                           f"{step.size[0]}x{step.size[1]} latent at downsampling {self.downsample}; it keeps every token")
            return self.fn_ref.original_forward(*args, **kwargs)
        cfg = self.patch.config
        random = cfg.use_rand and not (cfg.top_left_for_odd_batches and x.shape[0] % 2 == 1)
        reductions = block_reductions(x, (h, w), step.phase, mix32(step.key ^ self.salt) if random else None)
        if isinstance(reductions, str):
            step.notes.add(f"{self.name}: {reductions}; it keeps every token")
            return self.fn_ref.original_forward(*args, **kwargs)
        if reductions is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        stack = context.frames()
        stack.append(BlockCall(step, reductions, [0]))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            stack.pop()


class _LayerHook(ModelHook):
    """A hook on one layer of a patched block; ``frame`` is the block's forward in progress."""

    def __init__(self, patch: Patch, name: str) -> None:
        super().__init__()
        self.patch = patch
        self.name = name

    def frame(self) -> BlockCall | None:
        frame = context.current()
        return frame if type(frame) is BlockCall and frame.step.owner is self.patch else None


def _unmerged(tokens: Any, output: Any) -> Any:
    """The output of a layer run on merged tokens, back on every token (a joint attention returns
    ``(image, text)``: the image part)."""
    if isinstance(output, tuple):
        return (tokens.unmerge(output[0]), *output[1:])
    return tokens.unmerge(output)


class SelfAttentionHook(_LayerHook):
    """On ``attn1`` (SD3: ``attn``, joint with the text tokens, and ``attn2``): attention on the
    block's reduced tokens.

    Agent attention, and attention on pooled keys and values, are computed from the module's
    projections when its processor is one of diffusers' plain ones
    (:func:`~agentsd.attention.computes_plain_attention`). Plain attention on merged tokens (the
    ToMe phase) runs the processor itself on them, whichever it is. With another processor, the
    agent phase merges around it, ToMe style and without agents, and pooled keys and values give
    way to every token; both are logged once.
    """

    def new_forward(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        frame = self.frame()
        if frame is None:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        r, notes = frame.merges, frame.step.notes
        encoder_hidden_states = args[0] if args else kwargs.get("encoder_hidden_states")
        attention_mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        joint = is_joint(attn, encoder_hidden_states)
        reason = ("got an attention mask" if attention_mask is not None else
                  "got encoder hidden states" if encoder_hidden_states is not None and not joint else
                  unsupported(attn, hidden_states, r.num_tokens))
        if reason:
            notes.add(f"{self.name}: its self-attention {reason}; it keeps every token")
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        tokens = r.tokens
        if r.agents is None and r.kv is None:  # plain attention on merged tokens: the user's processor
            return _unmerged(tokens, self.fn_ref.original_forward(tokens.merge(hidden_states), *args, **kwargs))
        processor = attn.processor
        if computes_plain_attention(processor):
            return reduced_attention(attn, hidden_states, r, self.patch.config,
                                     encoder_hidden_states if joint else None)
        kind = type(processor).__name__
        if tokens is not None and r.kv is None:
            notes.add(f"{self.name}: agent attention cannot reproduce the processor {kind}, so it runs on the "
                      "merged tokens without agents (ToMe)")
            return _unmerged(tokens, self.fn_ref.original_forward(tokens.merge(hidden_states), *args, **kwargs))
        notes.add(f"{self.name}: the processor {kind} computes its own keys and values, so they are not "
                  "pooled; it keeps every token")
        return self.fn_ref.original_forward(hidden_states, *args, **kwargs)


class CrossAttentionHook(_LayerHook):
    """On ``attn2`` (``merge_crossattn``): the processor runs on the merged tokens, its output goes
    back to every token. IP-Adapter processors keep every token (their masks and scales apply to
    each one), logged once."""

    def new_forward(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        frame = self.frame()
        tokens = frame.merges.tokens if frame is not None else None
        if tokens is None:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        reason = ("has an IP-Adapter processor, whose masks and scale apply to every token"
                  if isinstance(attn.processor, _ip_adapter_processors()) else
                  unsupported(attn, hidden_states, tokens.num_tokens))
        if reason:
            frame.step.notes.add(f"{self.name}: merge_crossattn: its cross-attention {reason}; it keeps every token")
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        return tokens.unmerge(self.fn_ref.original_forward(tokens.merge(hidden_states), *args, **kwargs))


class FeedForwardHook(_LayerHook):
    """On the block's feed-forward (``merge_mlp``): it runs on the merged tokens.

    With ``enable_forward_chunking`` over the batch (``dim=0``) each chunk is merged with its own
    rows' merge. Over the tokens (``dim=1``) a chunk holds only part of each merged token's
    tokens, so the feed-forward runs on every token, logged once.
    """

    def new_forward(self, ff: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        frame = self.frame()
        tokens = frame.merges.tokens if frame is not None else None
        if tokens is None or hidden_states.ndim != 3:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        b, n = hidden_states.shape[:2]
        if n != tokens.num_tokens:
            frame.step.notes.add(f"{self.name}: merge_mlp: its feed-forward got {n} of {tokens.num_tokens} tokens "
                                 "(enable_forward_chunking over the tokens), and a part of the tokens cannot be "
                                 "merged on its own; it runs on every token")
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        if b != tokens.batch:  # chunked over the batch: these rows come next
            start = frame.rows[0]
            frame.rows[0] = start + b
            tokens = tokens.rows(start, b)
        return tokens.unmerge(self.fn_ref.original_forward(tokens.merge(hidden_states), *args, **kwargs))


def _ip_adapter_processors() -> tuple[type, ...]:
    from diffusers.models import attention_processor as ap

    names = ("IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0", "IPAdapterXFormersAttnProcessor")
    return tuple(getattr(ap, name) for name in names if hasattr(ap, name))


# ----------------------------------------------------------------------------- registering


class HookedForward:
    """What ``module.forward`` calls once a ``ModelHook`` is registered on ``module``.

    :meth:`call` does what the forward that diffusers' ``HookRegistry.register_hook`` installs
    does (the hook's ``pre_forward``, the forward it wraps, its ``post_forward``), as the method of
    an object that holds its module and the hook's ``fn_ref``, where the registry installs a
    closure over them. So ``copy.deepcopy`` of a patched model gives a copy that calls its own
    weights (the registry's closure keeps calling the original module from a copy), ``pickle`` and
    ``torch.save`` work (a closure cannot be pickled), and regionally compiled blocks share one
    graph (``torch.compile`` guards on the identity of a closure or callable object, so it would
    compile each hooked block again).
    """

    def __init__(self, module: torch.nn.Module, fn_ref: Any) -> None:
        self.module = module
        self.fn_ref = fn_ref

    def call(self, *args: Any, **kwargs: Any) -> Any:
        ref = self.fn_ref
        args, kwargs = ref.pre_forward(self.module, *args, **kwargs)
        return ref.post_forward(self.module, ref.forward(*args, **kwargs))


class OwnForward:
    """The module class's own ``forward``, bound to ``module``.

    A bound method pickles as ``getattr(module, "forward")``, which a hooked module answers with
    its hooked forward; this object pickles as what it is.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.function = type(module).forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.module, *args, **kwargs)


def _is_own_forward(forward: Any, module: torch.nn.Module) -> bool:
    return isinstance(forward, OwnForward) and forward.module is module or (
        getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward)


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> bool:
    """Register ``hook`` as ``name`` in the ``HookRegistry`` of ``module`` (with forwards that copy
    and pickle, see :class:`HookedForward`); True when the registry was made for it."""
    new = not hasattr(module, "_diffusers_hook")
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    ref = hook.fn_ref
    for attr in ("forward", "original_forward"):
        if _is_own_forward(getattr(ref, attr), module):
            setattr(ref, attr, OwnForward(module))
    module.forward = HookedForward(module, ref).call
    return new


def unregister(module: torch.nn.Module, name: str, drop_registry: bool) -> None:
    """Remove the hook ``name`` from the registry of ``module``; with ``drop_registry``, a registry
    left empty goes too, and so does the forward it left on the module if it is the class's own,
    so the module is exactly as before :func:`register`."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if drop_registry and not registry.hooks:
        del module._diffusers_hook
        if _is_own_forward(module.__dict__.get("forward"), module):
            del module.forward

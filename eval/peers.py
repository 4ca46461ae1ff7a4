"""Training-free peers as harness methods: T-GATE and CA-ToMe (PyPI), and diffusers' Pyramid
Attention Broadcast.

``tgate`` (T-GATE 1.0.0, arXiv 2404.02747) is a pipeline loader. ``TgateSDLoader(pipe)`` adds
``pipe.tgate(...)``, a denoising loop of its own that replaces the forward of every attention layer
with T-GATE's attention. Before ``gate_step`` it caches self-attention every ``sp_interval`` steps
(after ``warm_up`` steps); at the gate step it caches the cross-attention output (the mean of the
two guidance halves); after it, it reuses that output, drops the text half of guidance and caches
self-attention every ``fi_interval`` steps. So a row of it wraps the whole pipeline call: the FID
harness calls ``pipe.tgate`` instead of ``pipe``, and the per-step harness has no row for it.
``tgate+deepcache`` goes through T-GATE's own ``TgateSDDeepCacheLoader``, with the harness's DeepCache
settings. T-GATE never takes its forwards off again, and a plain ``pipe(...)`` after ``pipe.tgate``
fails (its cached cross-attention has half the batch); removal here takes off every attribute it
added, so the pipeline is the original again, bit for bit.

``ca-tome`` (CA-ToMe 0.1.3, arXiv 2501.00946) is tomesd's merge with a similarity threshold instead
of a ratio, with the match kept between the checkpoint steps of a cache configuration. It patches
the UNet (the top level's self-attention, as tomesd), so it runs in diffusers' own loop and in the
per-step harness, through the step shim of :mod:`eval.ca_tome_step`. Its threshold merges only
similar tokens, and the random features of the per-step harness's UNet have almost none (4095 of
4096 tokens kept at 512 px), so its per-step row there shows the cost of matching, not its saving.

``pab`` is diffusers' Pyramid Attention Broadcast (``apply_pyramid_attention_broadcast``, arXiv
2408.12588): the self-attention of every transformer block is computed every
``spatial_attention_block_skip_range`` calls, and reused in between, while the timestep lies in
``spatial_attention_timestep_skip_range`` (diffusers' defaults: 2 and (100, 800)). It is the one of
diffusers' caches that attaches to a UNet as well as to a transformer (FirstBlockCache and the
others need the pipeline to set a cache context, which neither Stable Diffusion's nor PixArt's
pipelines do). Its hooks need the current timestep and a reset before each generation, which
pipelines made for it provide: here a forward pre-hook on the denoiser records the timestep and
resets them when it rises (a new generation). ``agentsd+pab`` and ``agentsd-pool+pab`` put PAB on top
of AgentSD (applied after it, so that it reuses AgentSD's outputs).

A peer that is not installed, or does not run on this torch or diffusers, is a row with its reason
(:func:`unavailable`, :func:`failure`); a stack that cannot compose is refused by name
(:func:`refusal`), with why.
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from eval.ca_tome_step import pass_step
from eval.schedules import pndm_schedule

#: T-GATE 1.0.0's defaults, used where a setting is not given: those of ``TgateSDLoader``'s
#: ``tgate`` (also the README's for SDXL at 25 steps) and of ``TgateSDDeepCacheLoader``'s.
TGATE_DEFAULTS = {False: dict(sp_interval=5, warm_up=2), True: dict(sp_interval=1, warm_up=0)}
#: The cache configurations of ca-tome 0.1.3 (``ca_tome.CacheConf``; steps numbered from 1).
CA_TOME_CONFIGS = ("CONFIG_1", "CONFIG_2", "CONFIG_3", "CONFIG_4", "ADAPTIVE", "CONFIG_Five")


def failure(err: BaseException) -> str:
    """Why a peer did not run, in one line: the exception's type and the first line of its text."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def unavailable(package: str) -> str | None:
    """None if ``package`` imports, else why not (one line)."""
    try:
        importlib.import_module(package)
    except Exception as err:  # noqa: BLE001 - an ImportError, or whatever a changed API raises at import
        return failure(err)
    return None


class _Attributes:
    """The instance attributes of some objects before a peer patches them; :meth:`restore` takes
    off every attribute added since and puts back a replaced ``forward``."""

    def __init__(self, objects: list[Any]) -> None:
        self.saved = [(obj, dict(vars(obj))) for obj in objects]

    def restore(self) -> None:
        for obj, before in self.saved:
            for key in set(vars(obj)) - set(before):
                del obj.__dict__[key]
            if "forward" in before and obj.__dict__.get("forward") is not before["forward"]:
                obj.__dict__["forward"] = before["forward"]


def _pipeline_and_unet(target: Any) -> tuple[Any | None, torch.nn.Module]:
    if hasattr(target, "unet"):
        return target, getattr(target.unet, "_orig_mod", target.unet)
    return None, getattr(target, "_orig_mod", target)


@dataclass(frozen=True)
class TGateSettings:
    """T-GATE's settings for SD1.5: ``gate_step`` 10 (of the 25 steps of every example of its
    README); ``sp_interval`` and ``warm_up`` None take T-GATE's defaults (5 and 2; 1 and 0 with
    DeepCache), ``fi_interval`` 1."""

    gate_step: int = 10
    sp_interval: int | None = None
    fi_interval: int = 1
    warm_up: int | None = None
    package: ClassVar[str] = "tgate"
    whole_call: ClassVar[bool] = True  # a row calls pipe.tgate(...)
    own_deepcache: ClassVar[bool] = True  # tgate+deepcache: T-GATE's own DeepCache loader

    def __post_init__(self) -> None:
        for name, low in (("gate_step", 1), ("sp_interval", 1), ("fi_interval", 1), ("warm_up", 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"T-GATE {name} (--tgate-{name.replace('_', '-')}) must be an integer >= {low}, "
                                 f"got {value!r}")

    def resolved(self, deepcache: bool) -> dict[str, int]:
        """The keywords of ``pipe.tgate``."""
        given = dict(gate_step=self.gate_step, sp_interval=self.sp_interval, fi_interval=self.fi_interval,
                     warm_up=self.warm_up)
        return {k: TGATE_DEFAULTS[deepcache][k] if v is None else v for k, v in given.items()}

    def to_dict(self, deepcache: bool) -> dict[str, Any]:
        loader = "TgateSDDeepCacheLoader" if deepcache else "TgateSDLoader"
        return {"loader": loader, **self.resolved(deepcache)}

    def apply(self, target: Any, deepcache: Any | None) -> Any:
        """Load T-GATE on the pipeline ``target`` (DeepCache's settings when given); returns the
        function that takes it off again."""
        pipe, unet = _pipeline_and_unet(target)
        if pipe is None:
            raise ValueError("tgate wraps the whole pipeline call; it has no per-step row")
        import tgate

        saved = _Attributes([pipe, *unet.modules()])
        if deepcache is None:
            tgate.TgateSDLoader(pipe)
        else:
            tgate.TgateSDDeepCacheLoader(pipe, cache_interval=deepcache.cache_interval,
                                         cache_branch_id=deepcache.cache_branch_id)

        def remove() -> None:
            helper = pipe.__dict__.get("deepcache")
            if deepcache is not None and helper is not None:
                helper.disable()
            saved.restore()

        return remove

    def call(self, pipe: Any, deepcache: Any | None) -> Any:
        """What generates a batch in place of ``pipe``: ``pipe.tgate`` with these settings."""
        return functools.partial(pipe.tgate, **self.resolved(deepcache is not None))


@dataclass(frozen=True)
class CAToMeSettings:
    """CA-ToMe's settings for SD1.5: cache configuration ``CONFIG_3`` and similarity threshold 0.7,
    the best row of its README's table with caching (SD1.5, 50 PLMS steps) and its ``apply_patch``
    default; the other settings are ``apply_patch``'s defaults (top level, 2x2 cells, random dst,
    self-attention only)."""

    config: str = "CONFIG_3"
    threshold: float = 0.7
    package: ClassVar[str] = "ca_tome"
    whole_call: ClassVar[bool] = False
    own_deepcache: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.config not in CA_TOME_CONFIGS:
            raise ValueError(f"CA-ToMe config (--catome-config) must be one of {', '.join(CA_TOME_CONFIGS)}; "
                             f"got {self.config!r}")
        t = self.threshold
        if not isinstance(t, (int, float)) or not math.isfinite(t) or not -1 <= t <= 1:
            raise ValueError(f"CA-ToMe threshold (--catome-threshold) must be a number in [-1, 1], got {t!r}")

    def to_dict(self, deepcache: bool) -> dict[str, Any]:
        return {"cache_config": self.config, "threshold": self.threshold}

    def checkpoints(self) -> list[int]:
        from ca_tome import CacheConf

        return list(getattr(CacheConf, self.config))

    def apply(self, target: Any, deepcache: Any | None) -> Any:
        """CA-ToMe on a pipeline (``apply_CA_ToMe``) or a bare UNet (its two UNet steps, whose
        steps are numbered in SD's 50-step PNDM schedule), with the step shim; returns the
        function that takes it off again."""
        from ca_tome import apply_CA_ToMe
        from ca_tome.modifiers import modify_unet
        from ca_tome.patch import apply_patch, remove_patch

        pipe, unet = _pipeline_and_unet(target)
        saved = _Attributes([*([pipe] if pipe is not None else []), *unet.modules()])
        if pipe is not None:
            apply_CA_ToMe(pipe, cache_conf=self.checkpoints(), r=self.threshold)
            pass_step(unet, pipe)
        else:
            modify_unet(unet)
            apply_patch(unet, self.checkpoints(), r=self.threshold)
            pass_step(unet, schedule=pndm_schedule().timesteps)

        def remove() -> None:
            remove_patch(unet)
            saved.restore()

        return remove

    def cycle(self, schedule: torch.Tensor) -> tuple[int, ...]:
        """The timesteps of one cache cycle of ``schedule`` (the latency harness's sample): from
        the checkpoint at or before its middle step to the step before the next checkpoint, so
        the match is computed once and reused in the other steps."""
        n = len(schedule)
        points = sorted(s for s in self.checkpoints() if 1 <= s <= n)
        start = max((s for s in points if s <= (n + 1) // 2), default=1)
        stop = min((s for s in points if s > start), default=n + 1)
        return tuple(int(t) for t in schedule[start - 1:stop - 1])


class _PABClock:
    """A forward pre-hook of the denoiser: the timestep PAB's hooks ask for, and their reset when a
    call's timestep is above the last one's (the first step of a new generation)."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        from agentsd.hooks import Argument

        self.denoiser = denoiser
        self.timestep = Argument.of(denoiser, "timestep")
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    @torch.compiler.disable
    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        import agentsd
        from diffusers.hooks import HookRegistry

        t = agentsd.timestep_value(self.timestep.get(args, kwargs))
        if t > self.now:
            HookRegistry.check_if_exists_or_initialize(self.denoiser).reset_stateful_hooks()
        self.now = t


@dataclass(frozen=True)
class PABSettings:
    """diffusers' Pyramid Attention Broadcast on the self-attention of every block, with its
    defaults: computed every ``skip_range`` calls while the timestep is in ``timesteps``."""

    skip_range: int = 2
    timesteps: tuple[int, int] = (100, 800)
    package: ClassVar[str] = "diffusers"
    whole_call: ClassVar[bool] = False
    own_deepcache: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.skip_range, int) or self.skip_range < 1:
            raise ValueError(f"PAB skip range must be an integer >= 1, got {self.skip_range!r}")

    def to_dict(self, deepcache: bool) -> dict[str, Any]:
        return {"spatial_attention_block_skip_range": self.skip_range,
                "spatial_attention_timestep_skip_range": list(self.timesteps)}

    def apply(self, target: Any, deepcache: Any | None) -> Any:
        """PAB on the denoiser of ``target``; returns the function that takes it off again."""
        from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

        from agentsd.models import denoiser_of

        denoiser, _ = denoiser_of(target)
        clock = _PABClock(denoiser)
        saved = _Attributes(list(denoiser.modules()))
        apply_pyramid_attention_broadcast(denoiser, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.skip_range,
            spatial_attention_timestep_skip_range=self.timesteps, current_timestep_callback=clock))
        handle = denoiser.register_forward_pre_hook(clock.hook, with_kwargs=True)

        def remove() -> None:
            handle.remove()
            for module in denoiser.modules():
                registry = module.__dict__.get("_diffusers_hook")
                if registry is not None:
                    registry.remove_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK, recurse=False)
            saved.restore()

        return remove


#: The names of the peers of this module (the stacks that cannot compose are refused by name).
PEER_NAMES = ("tgate", "ca-tome")
_PROCESSORS = ("agentsd", "agentsd-pool", "agentsd-xattn", "agentsd-mlp", "todo", "bound", "bound-xattn", "bound-mlp")


def _why(other: str, peer: str) -> str:
    if peer == "tgate" and other in _PROCESSORS:
        tested = " (with agentsd the images are T-GATE's alone, bit for bit)" if other == "agentsd" else ""
        return (f"T-GATE replaces the forward of every attention layer with its own attention, which never calls "
                f"the attention processor that {other} installs, so {other} would be silently off{tested}")
    if peer == "tgate" and other == "tomesd":
        return ("T-GATE reuses self-attention outputs across steps while tomesd merges other tokens at every step, "
                "so the reused outputs would belong to other tokens")
    if {other, peer} == {"tgate", "ca-tome"}:
        return ("T-GATE reuses attention outputs across steps while CA-ToMe merges other tokens at its checkpoints, "
                "and T-GATE's loop does not number the steps CA-ToMe's forward needs")
    if other.startswith("agentsd"):
        return ("both merge the tokens of the same top-level self-attention: CA-ToMe merges them before attn1, "
                "and AgentSD then finds fewer tokens than it matched and falls back to plain attention")
    if other == "todo":
        return ("ToDo lays attn1's tokens out on the latent grid, which CA-ToMe's merge has shrunk, "
                "so ToDo would be silently off")
    if other == "tomesd":
        return ("both replace the class of the same transformer blocks (CA-ToMe is tomesd's merge with a threshold "
                "and a cache), so the second patch would replace the first")
    return f"the bound makes attention free, which leaves nothing for {peer} to save"


def refusal(name: str, known: Any) -> str | None:
    """Why the stack ``name`` (``<method>+<peer>`` or ``<peer>+<method>``, DeepCache already
    stripped) is refused, or None if it is no such stack of ``known`` methods."""
    first, plus, second = name.partition("+")
    if not plus or first not in known or second not in known or not {first, second} & set(PEER_NAMES):
        return None
    if first == second:
        return f"{name} stacks {first} on itself"
    peer, other = (first, second) if first in PEER_NAMES else (second, first)
    return f"{first} and {second} do not compose: {_why(other, peer)}"

"""The methods both harnesses compare, in one registry with one naming.

A :class:`Method` is a registered method (:data:`SPECS`) at a ratio (for those that have one), in
a denoising phase (AgentSD methods), with DeepCache on top or not. It switches itself on and off
on a diffusers pipeline or a bare UNet, names its baseline and its bound (the rows its share of
the possible saving runs between) and records its settings for the run's setup.

Names: ``sd``, ``tomesd``, ``todo``, ``agentsd``, ``agentsd-pool``, ``agentsd-xattn``,
``agentsd-mlp``, the bounds ``bound``, ``bound-xattn``, ``bound-mlp``, and ``<method>+deepcache``
for any of them (``deepcache`` is ``sd`` with DeepCache); the peers from PyPI (:data:`PEERS`,
:mod:`eval.peers`) ``tgate`` (it wraps the whole pipeline call), ``tgate+deepcache`` and
``ca-tome``, whose stacks with another method are refused by name, with why. An AgentSD method
takes its phase from the harness (``schedule``: the default recipe over the steps; ``agent``: agent
attention on every step, ``agent_fraction=1``; ``late``: the late phase on every step,
``agent_fraction=0``) or from the name, ``agentsd:late``. The names of earlier versions are
accepted as deprecated aliases (:data:`ALIASES`) and a note names the new one.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import torch

import agentsd
from agentsd.attention import is_joint
from agentsd.models import RECIPES, denoiser_of, patched_blocks, self_attentions
from eval.peers import CAToMeSettings, PABSettings, TGateSettings, refusal, unavailable
from eval.schedules import pndm_schedule
from eval.todo import ToDoSettings, apply_todo, remove_todo


@dataclass(frozen=True)
class DeepCacheSettings:
    """DeepCache's settings; the defaults are its recommended ones for SD1.5 (its README): a full
    UNet every 3rd step, cache branch 0."""

    cache_interval: int = 3
    cache_branch_id: int = 0

    def __post_init__(self) -> None:
        if self.cache_interval < 1 or self.cache_branch_id < 0:
            raise ValueError("--deepcache-interval must be >= 1 and --deepcache-branch >= 0")


DEEPCACHE_DEFAULTS = DeepCacheSettings()
#: AgentSD phases and the ``agent_fraction`` each applies (None: the library's default schedule).
PHASES = {"schedule": None, "agent": 1.0, "late": 0.0}


@dataclass(frozen=True)
class Spec:
    """A registered method: ``agentsd`` holds the ``apply_patch`` keywords of an AgentSD method,
    ``free`` the parts of the patched blocks that a bound makes cost nothing."""

    name: str
    summary: str
    has_ratio: bool = False
    bound: str = "bound"  # "": none
    agentsd: dict[str, Any] | None = None
    free: tuple[str, ...] = ()


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("sd", "the unpatched pipeline (diffusers' default attention processor, SDPA)"),
    Spec("tomesd", "token merging, the tomesd package at the ratio (its defaults)", has_ratio=True),
    Spec("todo", "token downsampling: top-level keys and values from a downsampled grid (eval/todo.py)"),
    Spec("agentsd", "AgentSD: agent attention on merged tokens", True, agentsd={"reduction": "merge"}),
    Spec("agentsd-pool", "AgentSD with pooled agents and keys/values, no matching", True,
         agentsd={"reduction": "pool"}),
    Spec("agentsd-xattn", "AgentSD with merge_crossattn", True, "bound-xattn", agentsd={"reduction": "merge", "merge_crossattn": True}),
    Spec("agentsd-mlp", "AgentSD with merge_mlp", True, "bound-mlp", agentsd={"reduction": "merge", "merge_mlp": True}),
    Spec("bound", "the patched self-attention returns zeros", bound="bound", free=("attn1",)),
    Spec("bound-xattn", "self- and cross-attention of the patched blocks free", bound="bound-xattn",
         free=("attn1", "attn2")),
    Spec("bound-mlp", "self-attention and feed-forward of the patched blocks free", bound="bound-mlp",
         free=("attn1", "ff")),
)}
#: Peers from PyPI that may not be installed or may not run here (a row then gives the reason).
PEERS: dict[str, Spec] = {s.name: s for s in (
    Spec("tgate", "T-GATE: cross-attention cached after a gate step, guidance's text half dropped (pipe.tgate)",
         bound=""),
    Spec("ca-tome", "CA-ToMe: tomesd's merge by similarity threshold, the match cached between checkpoints"),
    Spec("pab", "diffusers' Pyramid Attention Broadcast: self-attention reused every other step", bound=""),
    Spec("agentsd+pab", "AgentSD with PAB on top", True, bound="", agentsd={"reduction": "merge"}),
    Spec("agentsd-pool+pab", "AgentSD (pooled) with PAB on top", True, bound="", agentsd={"reduction": "pool"}),
)}
#: Every registered method, in table order.
REGISTRY: dict[str, Spec] = {**SPECS, **PEERS}
#: Methods that patch Stable Diffusion UNets only (DeepCache stacks too).
UNET_ONLY = ("tomesd", "tgate", "ca-tome")
DEEPCACHE = "+deepcache"
#: Every name a harness accepts (besides ``<method>+deepcache`` for the variants).
NAMES = (*REGISTRY, "deepcache", "tomesd+deepcache", "todo+deepcache", "agentsd+deepcache",
         "agentsd-pool+deepcache", "bound+deepcache", "tgate+deepcache")
#: Names of earlier versions: what each is now.
ALIASES = {"sdpa": "sd", "agentsd-agent": "agentsd:agent", "agentsd-tome": "agentsd:late",
           "agentsd-agent-xattn": "agentsd-xattn:agent", "agentsd-agent-mlp": "agentsd-mlp:agent",
           "agentsd-agent+deepcache": "agentsd+deepcache:agent"}


class ZeroAttnProcessor:
    """Attention that costs nothing: returns zeros (the bound of any attention speed-up); a joint
    attention (SD3) returns zeros for its image and its text tokens."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> Any:
        if is_joint(attn, encoder_hidden_states):
            return torch.zeros_like(hidden_states), torch.zeros_like(encoder_hidden_states)
        return torch.zeros_like(hidden_states)


class ZeroFeedForward(torch.nn.Module):
    """A feed-forward that costs nothing: returns zeros (input and output widths are equal)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@dataclass(eq=False)
class Method:
    """One row of a harness: a registered method at ``ratio`` in ``phase``, with ``deepcache`` on
    top when given; ``todo`` holds ToDo's settings, ``peer`` a peer's (:mod:`eval.peers`)."""

    spec: Spec
    ratio: float | None = None
    phase: str | None = None
    deepcache: DeepCacheSettings | None = None
    todo: ToDoSettings | None = None
    peer: TGateSettings | CAToMeSettings | PABSettings | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        if self.deepcache is None:
            return self.spec.name
        return "deepcache" if self.spec.name == "sd" else self.spec.name + DEEPCACHE

    @property
    def key(self) -> str:
        """The row's identity in files: name, ``@ratio``, ``:phase`` unless the default schedule."""
        ratio = "" if self.ratio is None else f"@{self.ratio:g}"
        return self.name + ratio + ("" if self.phase in (None, "schedule") else f":{self.phase}")

    @property
    def baseline(self) -> str:
        return "sd" if self.deepcache is None else "deepcache"

    @property
    def bound(self) -> str | None:
        if not self.spec.bound:
            return None
        return self.spec.bound + ("" if self.deepcache is None else DEEPCACHE)

    @property
    def is_bound(self) -> bool:
        return bool(self.spec.free)

    @property
    def keeps_images(self) -> bool:
        return not self.is_bound

    @property
    def per_step(self) -> bool:
        """Whether it runs inside the pipeline's own call (else it wraps the whole call)."""
        return self.peer is None or not self.peer.whole_call

    def unavailable(self) -> str | None:
        """Why it cannot run here (a peer's package does not import), or None."""
        return None if self.peer is None else unavailable(self.peer.package)

    def call(self, pipe: Any) -> Callable[..., Any]:
        """What generates a batch once applied: ``pipe``, or the peer's wrapper of the whole call."""
        return pipe if self.per_step else self.peer.call(pipe, self.deepcache)

    def settings(self) -> dict[str, Any]:
        """What the row ran with, for the run's setup."""
        spec, out = self.spec, {}
        if spec.agentsd is not None:
            fraction = PHASES[self.phase or "schedule"]
            out = dict(ratio=self.ratio, **spec.agentsd,
                       agent_fraction=agentsd.AgentSDConfig().agent_fraction if fraction is None else fraction)
        elif spec.name == "tomesd":
            import tomesd

            defaults = {k: p.default for k, p in inspect.signature(tomesd.apply_patch).parameters.items()
                        if p.default is not inspect.Parameter.empty}
            out = {**defaults, "ratio": self.ratio}
        elif spec.name == "todo":
            out = self.todo.to_dict()
        elif spec.free:
            out = {"free": list(spec.free)}
        elif self.peer is not None:
            out = self.peer.to_dict(self.deepcache is not None)
        if self.peer is not None and spec.agentsd is not None:  # a peer on top of AgentSD
            out.update(self.peer.to_dict(False))
        if self.deepcache is not None:
            out["deepcache"] = asdict(self.deepcache)
        return out

    def apply(self, target: Any) -> None:
        """Switch the method on ``target``, a pipeline or its denoiser (a UNet, or a PixArt or SD3
        transformer: the methods that patch UNets only refuse those, naming why).

        Raises:
            ValueError: for a method that does not apply to the target's denoiser.
        """
        unet, family = denoiser_of(target)
        spec = self.spec
        if family.name != "unet" and (spec.name in UNET_ONLY or self.deepcache is not None):
            raise ValueError(f"{self.name} patches Stable Diffusion UNets only, not a {type(unet).__name__}")
        if spec.agentsd is not None:
            fraction = PHASES[self.phase or "schedule"]
            extra = {} if fraction is None else {"agent_fraction": fraction}
            # the family's recipe, never settings stored with the model
            recipe = agentsd.AgentSDConfig(**RECIPES[family.name])
            agentsd.apply_patch(target, config=recipe, ratio=self.ratio, **spec.agentsd, **extra)
            self._undo.append(lambda: agentsd.remove_patch(target))
        elif spec.name == "tomesd":
            import tomesd

            tomesd.apply_patch(unet, ratio=self.ratio)
            self._undo.append(lambda: tomesd.remove_patch(unet))
        elif spec.name == "todo":
            apply_todo(target, self.todo)
            self._undo.append(lambda: remove_todo(target))
        elif spec.free:
            self._free(unet)
        if self.peer is not None:  # a peer alone, or on top of AgentSD (agentsd+pab)
            self._undo.append(self.peer.apply(target, self.deepcache))
        if self.deepcache is not None and not (self.peer is not None and self.peer.own_deepcache):
            from DeepCache import DeepCacheSDHelper

            pipe = target if hasattr(target, "unet") else SimpleNamespace(unet=unet, scheduler=pndm_schedule())
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(**asdict(self.deepcache))
            helper.enable()
            self._undo.append(helper.disable)

    def _free(self, denoiser: Any) -> None:
        denoiser, family = denoiser_of(denoiser)
        for name, (block, _) in patched_blocks(denoiser, family, None, 0).items():
            for part in self.spec.free:
                parts = self_attentions(block) if part == "attn1" else (part,)  # a transformer's attn / attn2 too
                for module in [getattr(block, p, None) for p in parts]:
                    if part == "ff" and module is not None:
                        block.ff = ZeroFeedForward()
                        self._undo.append(lambda b=block, m=module: setattr(b, "ff", m))
                    elif module is not None:
                        self._undo.append(lambda m=module, p=module.processor: m.set_processor(p))
                        module.set_processor(ZeroAttnProcessor())

    def remove(self, target: Any = None) -> None:
        """Switch the method off again (in the reverse order of :meth:`apply`)."""
        while self._undo:
            self._undo.pop()()


@dataclass(frozen=True)
class Options:
    """Settings shared by the rows of a run: the default AgentSD phase, DeepCache's, ToDo's and
    the peers'."""

    phase: str = "schedule"
    deepcache: DeepCacheSettings = DEEPCACHE_DEFAULTS
    todo: ToDoSettings = ToDoSettings()
    tgate: TGateSettings = TGateSettings()
    catome: CAToMeSettings = CAToMeSettings()
    pab: PABSettings = PABSettings()


def parse_name(name: str, notify: Callable[[str], None] | None = None) -> tuple[Spec, bool, str | None]:
    """``(spec, with DeepCache, pinned phase)`` of a method name (an alias gives a note).

    Raises:
        ValueError: for an unknown name or phase, or a stack that cannot compose.
    """
    if name in ALIASES:
        (notify or (lambda s: print(s, file=sys.stderr)))(
            f"note: method {name!r} is deprecated; it is now {ALIASES[name]!r}")
        name = ALIASES[name]
    base, _, phase = name.partition(":")
    cached = base == "deepcache" or base.endswith(DEEPCACHE)
    base = "sd" if base == "deepcache" else base.removesuffix(DEEPCACHE)
    refused = refusal(base, REGISTRY)
    if refused:
        raise ValueError(f"method {name!r}: {refused}")
    if base not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(NAMES)} "
                         f"(or <method>+deepcache; old names: {', '.join(ALIASES)})")
    if phase and (REGISTRY[base].agentsd is None or phase not in PHASES):
        raise ValueError(f"method {name!r}: only AgentSD methods have a phase ({', '.join(PHASES)})")
    return REGISTRY[base], cached, phase or None


def build_methods(names: Iterable[str], ratios: Iterable[float], options: Options | None = None,
                  notify: Callable[[str], None] | None = None) -> list[Method]:
    """The rows for ``names``, in their order: methods with a ratio once per ratio; a name given
    twice gives one row.

    Raises:
        ValueError: for an unknown method or phase, a ratio outside [0, 1), no ratio for a
            method that needs one, or no method at all.
    """
    options, ratios = options or Options(), list(ratios)
    bad = [r for r in ratios if not 0 <= r < 1]
    if bad:
        raise ValueError(f"ratios must be in [0, 1), got {', '.join(f'{r:g}' for r in bad)}")
    methods: dict[str, Method] = {}
    for name in names:
        head, colon, phase = name.partition(":")  # agentsd-pool@0.75[:late]: a row at its own ratio
        head, _, pinned = head.partition("@")
        name = head + colon + phase
        spec, cached, phase = parse_name(name, notify)
        own = _pinned_ratio(name, pinned, spec) if pinned else None
        if spec.has_ratio and not ratios and own is None:
            raise ValueError(f"{spec.name} needs at least one ratio")
        for ratio in ([own] if own is not None else ratios) if spec.has_ratio else [None]:
            peer = options.pab if spec.name.endswith("pab") else {"tgate": options.tgate,
                                                                   "ca-tome": options.catome}.get(spec.name)
            m = Method(spec, ratio, (phase or options.phase) if spec.agentsd is not None else None,
                       options.deepcache if cached else None, options.todo if spec.name == "todo" else None, peer)
            methods.setdefault(m.key, m)
    if not methods:
        raise ValueError("no method to compare")
    return list(methods.values())


def _pinned_ratio(name: str, text: str, spec: Spec) -> float:
    try:
        ratio = float(text)
    except ValueError:
        raise ValueError(f"method {name}@{text}: the ratio after @ must be a number") from None
    if not spec.has_ratio or not 0 <= ratio < 1:
        raise ValueError(f"method {name}@{text}: only methods with a ratio take @ratio, in [0, 1)")
    return ratio


def table_order(methods: list[Method], bounds: bool = True) -> list[Method]:
    """``methods`` ordered as the FID tables show them: the methods, then the DeepCache ones, then
    the bounds, each in registry order; with ``bounds``, ``bound`` and the bound of each method
    are added."""
    out = {m.key: m for m in methods}
    for m in [m for m in [*methods, Method(SPECS["sd"])] if m.spec.bound] if bounds else []:
        bound = Method(SPECS[m.spec.bound], deepcache=m.deepcache)
        out.setdefault(bound.key, bound)
    order = list(REGISTRY)
    return sorted(out.values(), key=lambda m: (m.is_bound, m.deepcache is not None, order.index(m.spec.name)))


def per_step(options: Options) -> Options:
    """The options of per-step timing: ToDo on at every timed step."""
    return replace(options, todo=replace(options.todo, off_after=1.0))


def check_per_step(methods: Iterable[Method]) -> None:
    """Refuse, in one line, a method that has no per-step row.

    Raises:
        ValueError: for a method that wraps the whole pipeline call (``tgate``).
    """
    for m in methods:
        if not m.per_step:
            raise ValueError(f"{m.name} wraps the whole pipeline call; it has no per-step row")

"""What the two command lines share: a parser whose errors are one line, the method options
(``--methods``, DeepCache's, ToDo's and the peers' settings, the AgentSD phase), device and dtype."""
from __future__ import annotations

import argparse
from typing import Any

from eval.methods import ALIASES, NAMES, PHASES, DeepCacheSettings, Options
from eval.peers import CA_TOME_CONFIGS, CAToMeSettings, TGateSettings
from eval.todo import MODES, ToDoSettings

_TODO, _TGATE, _CATOME = ToDoSettings(), TGateSettings(), CAToMeSettings()


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, without the usage block."""

    def __init__(self, doc: str | None) -> None:
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_method_arguments(p: argparse.ArgumentParser, default: list[str], phases: list[str],
                         off_after: bool, whole_calls: bool = False) -> None:
    """``--methods`` (default ``default``), ``--phase`` (choices ``phases``, when more than one),
    DeepCache's, ToDo's and CA-ToMe's settings (``--todo-off-after`` only if ``off_after``: a
    harness that times single steps runs ToDo on every step), and T-GATE's if ``whole_calls``
    (a harness that runs whole pipeline calls)."""
    p.add_argument("--methods", nargs="+", default=default, metavar="METHOD",
                   help=f"methods to compare: {' '.join(NAMES)}, agentsd-xattn+deepcache, ... "
                        f"(<method>+deepcache for any method); an AgentSD method may name its phase, e.g. "
                        f"agentsd:late; the old names {' '.join(ALIASES)} still work, with a note "
                        f"(default: {' '.join(default)})")
    if len(phases) > 1:
        p.add_argument("--phase", choices=phases, default=phases[0],
                       help=f"the denoising phase of the AgentSD methods: agent (agent_fraction=1.0) or late "
                            f"(agent_fraction=0.0, the ToMe / pooled late phase) (default: {phases[0]})")
    p.add_argument("--deepcache-interval", type=int, default=DeepCacheSettings.cache_interval,
                   help="DeepCache: a full UNet every N steps (default: 3, DeepCache's value for SD1.5)")
    p.add_argument("--deepcache-branch", type=int, default=DeepCacheSettings.cache_branch_id,
                   help="DeepCache cache_branch_id (default: 0, DeepCache's value for SD1.5)")
    p.add_argument("--todo-factor", type=float, default=_TODO.factor,
                   help="ToDo: keys and values from a grid this many times smaller per axis (default: 2)")
    p.add_argument("--todo-mode", choices=MODES, default=_TODO.mode,
                   help="ToDo: F.interpolate mode of the downsampling (default: nearest)")
    if off_after:
        p.add_argument("--todo-off-after", type=float, default=_TODO.off_after,
                       help="ToDo: share of the denoising steps with ToDo on, in (0, 1]; 1 = every step (default: 0.8)")
    p.add_argument("--todo-max-downsample", type=int, default=None,
                   help="ToDo: the deepest level patched, as its downsampling factor (1, 2, 4, ...; "
                        "default: the highest level with attention, 1 on SD 1.x/2.x)")
    if whole_calls:
        p.add_argument("--tgate-gate-step", type=int, default=_TGATE.gate_step,
                       help="T-GATE: the step from which cross-attention is cached and guidance's text half dropped "
                            "(default: 10, T-GATE's value at 25 steps)")
        p.add_argument("--tgate-sp-interval", type=int, default=None,
                       help="T-GATE: self-attention recomputed every N steps before the gate (default: 5; 1 with "
                            "DeepCache: T-GATE's loaders' defaults)")
        p.add_argument("--tgate-fi-interval", type=int, default=_TGATE.fi_interval,
                       help="T-GATE: self-attention recomputed every N steps after the gate (default: 1)")
        p.add_argument("--tgate-warm-up", type=int, default=None,
                       help="T-GATE: steps before self-attention is first cached (default: 2; 0 with DeepCache)")
    p.add_argument("--catome-config", choices=CA_TOME_CONFIGS, default=_CATOME.config,
                   help="CA-ToMe: the cache configuration, the steps that recompute the match (default: CONFIG_3, "
                        "its best in its README)")
    p.add_argument("--catome-threshold", type=float, default=_CATOME.threshold,
                   help="CA-ToMe: cosine similarity above which tokens merge, in [-1, 1] (default: 0.7)")


def method_options(p: argparse.ArgumentParser, args: Any, phase: str = "schedule") -> Options:
    """The :class:`~eval.methods.Options` of the parsed ``args``; a bad value is a one-line error."""
    try:
        todo = ToDoSettings(factor=args.todo_factor, mode=args.todo_mode,
                            off_after=getattr(args, "todo_off_after", _TODO.off_after),
                            max_downsample=args.todo_max_downsample)
        deepcache = DeepCacheSettings(args.deepcache_interval, args.deepcache_branch)
        tgate = TGateSettings(*(getattr(args, f"tgate_{k}", getattr(_TGATE, k))
                                for k in ("gate_step", "sp_interval", "fi_interval", "warm_up")))
        catome = CAToMeSettings(args.catome_config, args.catome_threshold)
    except ValueError as e:
        p.error(str(e))
    phase = getattr(args, "phase", phase)
    assert phase in PHASES
    return Options(phase=phase, deepcache=deepcache, todo=todo, tgate=tgate, catome=catome)


def add_device_arguments(p: argparse.ArgumentParser, default: str | None, help_default: str) -> None:
    """``--device`` and ``--dtype``."""
    p.add_argument("--device", default=default, help=f"cuda, cpu, cuda:1, ... (default: {help_default})")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on CUDA, fp32 on CPU")


def check_device(p: argparse.ArgumentParser, device: str | None) -> None:
    """A one-line error for a ``--device`` that is not one."""
    if device is not None:
        import torch

        try:
            torch.device(device)
        except RuntimeError:
            p.error(f"--device {device!r} is not a device (cuda, cpu, cuda:1, ...)")

"""AgentSD settings: the two phases of the official recipe, their validation and storage."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

#: Name of the JSON file that :func:`save_config` writes (e.g. beside LoRA weights).
CONFIG_FILE = "agentsd_config.json"
#: How a phase reduces the tokens: ``"merge"`` (ToMe matching, the official algorithm) or
#: ``"pool"`` (no matching: agents and keys/values pooled from fixed cells of the token grid).
Reduction = Literal["merge", "pool"]
#: How ``"pool"`` turns a cell of tokens into one token: its mean, or its top-left token.
PoolMode = Literal["mean", "nearest"]
REDUCTIONS = ("merge", "pool")
POOL_MODES = ("mean", "nearest")
#: ``ratio`` when it is None, by reduction: the official 0.4 for ``"merge"``; for ``"pool"``, keys
#: and values pooled 2x2 (ToDo's factor), better in speed and fidelity than 0.4 (docs/quality.md)
DEFAULT_RATIO = {"merge": 0.4, "pool": 0.75}
#: The training timesteps of every supported model family (diffusers' ``num_train_timesteps``):
#: the scale of the timestep that selects the phase (:meth:`AgentSDConfig.phase_at`).
NUM_TRAIN_TIMESTEPS = 1000


class _Unset:
    """The default of :func:`agentsd.apply_patch`'s settings: not given (so ``None`` can be given)."""

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self) -> str:
        return "UNSET"


#: A setting that was not given.
UNSET: Any = _Unset()


@dataclass(frozen=True)
class Phase:
    """How the patched self-attention runs during one phase of the denoising.

    Attributes:
        sx, sy: size of the cells from which one dst token is drawn (``"merge"``) or one agent is
            pooled (``"pool"``).
        ratio: ``"merge"``: share of all tokens merged away before attention; ``"pool"``: share of
            the keys and values pooled away (the queries keep every token).
        agent_ratio: ``"merge"``: share of all tokens merged away to form the agents. ``None``
            for plain attention without agents (ToMe, or ToDo-like with ``"pool"``). With
            ``"pool"`` any value means one agent per cell.
        reduction: ``"merge"`` or ``"pool"``.
        pool_mode: ``"mean"`` or ``"nearest"``, how ``"pool"`` makes one token of a cell.
    """

    sx: int
    sy: int
    ratio: float
    agent_ratio: float | None
    reduction: Reduction = "merge"
    pool_mode: PoolMode = "mean"

    @property
    def is_identity(self) -> bool:
        """True when the phase neither reduces tokens nor uses agents (plain attention)."""
        return self.ratio == 0 and self.agent_ratio is None


@dataclass(frozen=True)
class AgentSDConfig:
    """All settings of :func:`agentsd.apply_patch`; defaults follow the official SD recipe.

    The first ``agent_fraction`` of the denoising steps run agent attention on merged tokens
    (``sx x sy`` cells, ``ratio``, ``agent_ratio``); the remaining steps run ToMe on
    ``tome_sx x tome_sy`` cells with ``tome_ratio`` (``ratio`` when ``None``) and no agents.

    As in the official code, agents are used only when they are fewer than half the merged
    tokens; otherwise the step runs plain attention on the merged tokens. ``max_downsample=None``
    patches the highest-resolution level that has self-attention (1 for SD 1.x/2.x, 2 for SDXL).
    ``use_rand=False`` takes the top-left token of every cell as its dst (so does an odd batch,
    as in the official code). ``merge_crossattn`` and ``merge_mlp`` run the cross-attention and
    the feed-forward of the patched blocks on the merged tokens too.

    ``reduction="pool"`` replaces the token matching: the agents are the ``pool_mode`` of every
    ``sx x sy`` cell of the attention input (``agent_ratio`` is then unused), the keys and values
    come from the input pooled to ``1 - ratio`` of the tokens, and the queries keep every token,
    so nothing is unmerged. ``tome_reduction`` is the late phase's reduction (``None``: the same
    as ``reduction``); a ``"pool"`` late phase is plain attention on pooled keys and values
    (ToDo-like) with ``tome_ratio``. ``ratio=None`` is 0.4 with ``"merge"`` and 0.75 with
    ``"pool"`` (keys and values pooled 2x2).
    """

    ratio: float | None = None
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4
    agent_fraction: float = 0.4
    tome_ratio: float | None = None
    tome_sx: int = 2
    tome_sy: int = 2
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    max_downsample: int | None = None
    skip_ends: int = 0
    attn_precision: str | None = None
    seed: int = 0
    use_rand: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    reduction: Reduction = "merge"
    tome_reduction: Reduction | None = None
    pool_mode: PoolMode = "mean"
    top_left_for_odd_batches: bool = False

    def __post_init__(self) -> None:
        if self.ratio is not None:
            _check_range("ratio", self.ratio, 0.0, 1.0, low_open=False)
        _check_range("agent_ratio", self.agent_ratio, 0.0, 1.0, low_open=True)
        if self.tome_ratio is not None:
            _check_range("tome_ratio", self.tome_ratio, 0.0, 1.0, low_open=False)
        _check_range("agent_fraction", self.agent_fraction, 0.0, 1.0, low_open=False, high_open=False)
        for name in ("sx", "sy", "tome_sx", "tome_sy"):
            _check_int(name, getattr(self, name), 1)
        _check_int("skip_ends", self.skip_ends, 0)
        if self.max_downsample is not None:
            _check_int("max_downsample", self.max_downsample, 1)
        if self.max_downsample is not None and self.max_downsample & (self.max_downsample - 1):
            raise ValueError(f"max_downsample must be a power of two (1, 2, 4 or 8), got {self.max_downsample}")
        _check_number("k_scale2", self.k_scale2)
        if self.k_scale2 <= 0:
            raise ValueError(f"k_scale2 must be > 0, got {self.k_scale2}")
        _check_number("k_shortcut", self.k_shortcut)
        if self.attn_precision not in (None, "fp32"):
            raise ValueError(f"attn_precision must be None or 'fp32', got {self.attn_precision!r}")
        _check_int("seed", self.seed, 0)
        for name in ("use_rand", "merge_crossattn", "merge_mlp", "top_left_for_odd_batches"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_choice("tome_reduction", self.tome_reduction, (None, *REDUCTIONS))
        _check_choice("pool_mode", self.pool_mode, POOL_MODES)
        merges = {self.agent_phase.reduction, self.tome_phase.reduction} & {"merge"}
        for name in ("merge_crossattn", "merge_mlp"):
            if getattr(self, name) and not merges:
                raise ValueError(f"{name} needs merged tokens, and with reduction='pool' and "
                                 "tome_reduction='pool' no phase merges; set reduction or tome_reduction to 'merge'")

    # cached: the same Phase object every step, so compiled code does not see a new one
    @functools.cached_property
    def agent_phase(self) -> Phase:
        """The early phase: agent attention on merged tokens."""
        return Phase(self.sx, self.sy, self.effective_ratio, self.agent_ratio, self.reduction, self.pool_mode)

    @functools.cached_property
    def tome_phase(self) -> Phase:
        """The late phase: plain attention on merged tokens (ToMe) or on pooled keys and values."""
        reduction = self.reduction if self.tome_reduction is None else self.tome_reduction
        ratio = self.tome_ratio
        if ratio is None:
            ratio = DEFAULT_RATIO[reduction] if self.ratio is None else self.ratio
        return Phase(self.tome_sx, self.tome_sy, ratio, None, reduction, self.pool_mode)

    @property
    def effective_ratio(self) -> float:
        """``ratio``, or its default for ``reduction`` when it is None."""
        return DEFAULT_RATIO[self.reduction] if self.ratio is None else self.ratio

    @property
    def agent_threshold(self) -> float:
        """The smallest timestep of the agent phase: ``(1 - agent_fraction) * 1000``."""
        return (1.0 - self.agent_fraction) * NUM_TRAIN_TIMESTEPS

    def phase_at(self, timestep: float) -> Phase:
        """The phase of a denoiser call at ``timestep`` (on diffusers' 0-1000 scale).

        The agent phase runs on the noisy steps, where ``timestep >= (1 - agent_fraction) * 1000``:
        with 50 PNDM/PLMS steps and the default 0.4 these are steps 0-19 (981 to 601), the
        official recipe. ``agent_fraction=0`` never runs it, ``agent_fraction=1`` always does.
        """
        agent = self.agent_fraction > 0 and timestep >= self.agent_threshold
        return self.agent_phase if agent else self.tome_phase

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (every field)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "settings") -> "AgentSDConfig":
        """Inverse of :meth:`to_dict`; missing fields take their defaults.

        Keys that are not settings (written by a newer version of agentsd) are ignored with a
        warning that names them and ``source``, as diffusers' ``ConfigMixin`` does.

        Raises:
            ValueError: for a value out of range.
        """
        known = cls.__dataclass_fields__
        unknown = sorted(set(data) - set(known))
        if unknown:
            logger.warning("%s: ignoring unknown AgentSD setting(s) %s (from a newer agentsd?); valid: %s",
                           source, unknown, sorted(known))
        return cls(**{k: v for k, v in data.items() if k in known})


def save_config(config: AgentSDConfig, folder: str | Path) -> Path:
    """Write ``config`` as ``agentsd_config.json`` into ``folder`` (created if needed); returns the file."""
    path = Path(folder) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return path


def load_config(path: str | Path) -> AgentSDConfig:
    """Read the settings written by :func:`save_config`.

    Args:
        path: the ``agentsd_config.json`` file or the folder holding it (e.g. a LoRA output
            folder of ``scripts/train_dreambooth.py``). Use the result with
            ``agentsd.apply_patch(pipe, config=agentsd.load_config(folder))``.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if the file is not a valid settings file.
    """
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no AgentSD settings file {CONFIG_FILE} at {path}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object of AgentSD settings")
    return AgentSDConfig.from_dict(data, source=str(file))


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool = True
) -> None:
    _check_number(name, value)
    above_low = value > low if low_open else value >= low
    below_high = value < high if high_open else value <= high
    if not (above_low and below_high):  # written so that NaN fails too
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")

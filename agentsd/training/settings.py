"""The settings of a DreamBooth run: :class:`DreamBoothSettings`, their validation, and
:data:`RUN_FIELDS`, those that a resumed run must share with the checkpoint it continues.

Every field carries its command-line help in ``field(metadata=...)``: ``help`` (the text),
``group`` (the argument group) and, where the values are few, ``choices``.
``scripts/train_dreambooth.py`` builds its options from these fields alone, so a new field needs
no change there.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import DEFAULT_RATIO, REDUCTIONS, AgentSDConfig

#: the ``mixed_precision`` values accelerate takes
MIXED_PRECISION = ("no", "fp16", "bf16")
#: settings that define a run: a resumed run must have the same ones
RUN_FIELDS = (
    "instance_prompt", "class_prompt", "num_class_images", "prior_loss_weight", "resolution", "batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "seed", "lora_rank",
    "lora_alpha", "agentsd", "reduction", "ratio",
)


def check_resolution(resolution: Any) -> int:
    """Return ``resolution`` if it is a positive multiple of 8, else raise ValueError/TypeError."""
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise TypeError(f"resolution must be an int, got {type(resolution).__name__}")
    if resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    return resolution


def _opt(help: str, group: str, **more: Any) -> dict[str, Any]:
    """The metadata of one field: its help text and argument group (and ``choices`` if any)."""
    return {"help": help, "group": group, **more}


DATA, TRAINING, CHECKS = "data", "training", "checkpoints and validation"


@dataclass
class DreamBoothSettings:
    """Everything :func:`agentsd.training.train_dreambooth` needs; see ``scripts/train_dreambooth.py --help``.

    ``lora_rank=None`` finetunes the whole UNet; an int trains LoRA adapters of that rank on the
    UNet's attention projections. ``agentsd=False`` finetunes without AgentSD. Prior preservation
    is on when ``class_prompt`` is given (class images cached in ``class_dir``, default
    ``<output_dir>/class_images``).

    Raises:
        ValueError, TypeError: for a value out of range (resolution, counts, rates, ratio...).
    """

    pretrained: str = field(metadata=_opt("base pipeline folder or hub id", DATA))
    instance_dir: str = field(metadata=_opt("folder of the subject's images", DATA))
    instance_prompt: str = field(metadata=_opt('e.g. "a photo of sks dog"', DATA))
    output_dir: str = field(metadata=_opt("where the result, checkpoints and validation images go (OUT)", TRAINING))
    class_prompt: str | None = field(
        default=None, metadata=_opt('e.g. "a photo of a dog": turns on prior preservation', DATA))
    class_dir: str | None = field(default=None, metadata=_opt("class image cache (default: OUT/class_images)", DATA))
    num_class_images: int = field(default=100, metadata=_opt("class images for prior preservation", DATA))
    prior_loss_weight: float = field(default=1.0, metadata=_opt("weight of the class images' loss", DATA))
    resolution: int = field(default=512, metadata=_opt("image size in pixels, a multiple of 8", DATA))
    batch_size: int = field(
        default=1, metadata=_opt("instance images per step and process (plus as many class images)", TRAINING))
    gradient_accumulation_steps: int = field(default=1, metadata=_opt("micro-steps per optimisation step", TRAINING))
    learning_rate: float = field(default=5e-6, metadata=_opt("AdamW learning rate", TRAINING))
    lr_scheduler: str = field(default="constant", metadata=_opt("a diffusers.optimization schedule", TRAINING))
    lr_warmup_steps: int = field(default=0, metadata=_opt("warm-up steps of the LR schedule", TRAINING))
    max_train_steps: int = field(default=400, metadata=_opt("optimisation steps", TRAINING))
    seed: int = field(default=0, metadata=_opt("seed of all randomness (data, noise, LoRA init, images)", TRAINING))
    mixed_precision: str = field(default="no", metadata=_opt("accelerate's mixed precision", TRAINING,
                                                             choices=MIXED_PRECISION))
    lora_rank: int | None = field(
        default=None, metadata=_opt("train LoRA adapters of this rank (default: the full UNet)", TRAINING))
    lora_alpha: float | None = field(default=None, metadata=_opt("LoRA alpha (default: the rank)", TRAINING))
    agentsd: bool = field(
        default=True, metadata=_opt("AgentSD on every training step (off: plain DreamBooth)", TRAINING))
    reduction: str = field(default="merge", metadata=_opt(
        "how AgentSD builds its agents: merge (the official token merging) or pool (cell pooling)", TRAINING,
        choices=REDUCTIONS))
    ratio: float | None = field(
        default=None, metadata=_opt("AgentSD ratio (default: " + ", ".join(
            f"{value} for {name}" for name, value in DEFAULT_RATIO.items()) + ")", TRAINING))
    checkpointing_steps: int = field(default=100, metadata=_opt("steps between checkpoints", CHECKS))
    keep_checkpoints: int = field(default=2, metadata=_opt("checkpoints kept (the latest ones)", CHECKS))
    validation_prompt: str | None = field(
        default=None, metadata=_opt("prompt of the validation images (default: none made)", CHECKS))
    validation_steps: int = field(default=100, metadata=_opt("steps between validation images", CHECKS))
    num_validation_images: int = field(default=2, metadata=_opt("validation images each time", CHECKS))
    inference_steps: int = field(default=25, metadata=_opt("denoising steps of class and validation images", CHECKS))
    guidance_scale: float = field(
        default=7.5, metadata=_opt("classifier-free guidance of class and validation images", CHECKS))
    progress: bool = field(default=True, metadata=_opt("show the progress bars", CHECKS))

    def __post_init__(self) -> None:
        for name, hint in _field_types().items():
            _check_type(name, getattr(self, name), hint)
        check_resolution(self.resolution)
        for name in (
            "num_class_images", "batch_size", "gradient_accumulation_steps", "max_train_steps",
            "checkpointing_steps", "keep_checkpoints", "validation_steps", "num_validation_images",
            "inference_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("lr_warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1 or None, got {self.lora_rank!r}")
        for name in ("learning_rate", "lora_alpha"):  # written so that NaN fails too
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("prior_loss_weight", "guidance_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        schedules = _lr_schedules()
        if self.lr_scheduler not in schedules:
            raise ValueError(f"lr_scheduler must be one of {', '.join(schedules)}; got {self.lr_scheduler!r}")
        if not self.instance_prompt.strip():
            raise ValueError("instance_prompt must not be empty")
        self.agentsd_config()  # validates ratio and reduction

    def agentsd_config(self) -> AgentSDConfig:
        """The AgentSD settings of training and of the result: agent attention on every step."""
        config = AgentSDConfig(ratio=self.ratio, reduction=self.reduction, agent_fraction=1.0)
        return dataclasses.replace(config, ratio=config.effective_ratio)

    def run_dict(self) -> dict[str, Any]:
        """The settings that define the run (compared when resuming)."""
        return {name: getattr(self, name) for name in RUN_FIELDS}


@functools.lru_cache(maxsize=1)
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(DreamBoothSettings)


@functools.lru_cache(maxsize=1)
def _lr_schedules() -> tuple[str, ...]:
    from diffusers.optimization import SchedulerType

    return tuple(kind.value for kind in SchedulerType)


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Raise TypeError unless ``value`` has the type ``hint`` (``str``, ``int``, ``float``, ``bool``,
    or one of them ``| None``); a float must be finite, and a bool is not a number."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return
    kind = next(t for t in allowed if t is not type(None))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        expected = kind.__name__ + (" or None" if type(None) in allowed else "")
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")

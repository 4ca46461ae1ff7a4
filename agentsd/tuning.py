"""Measure the user's own device and pick the fastest AgentSD setting, or none.

Whether AgentSD's token reduction pays depends on the device, the resolution, the batch, the
dtype, the attention kernel and whether the model is compiled. :func:`tune` times one denoiser
call of every candidate (no patch, ``reduction="merge"``, ``reduction="pool"``, the settings
stored with the model and any the caller adds) in each phase of the patch, on dummy inputs of the
caller's shape, on the model itself, and returns the fastest setting only when it beats the
unpatched model by more than the measured noise::

    result = agentsd.tune(pipe, height=1024, width=1024)
    print(result)                     # the table
    result.apply(pipe)                # the fastest setting, or no patch when nothing beats it

Protocol (details in ``docs/tune.md``):

- inputs: dummy denoiser inputs of the requested shape on the model's device and dtype
  (:func:`denoiser_inputs`, the one place that knows what a model family is conditioned on), one
  timestep per sample as the pipelines pass it;
- every candidate, in each phase (a call at timestep 999, the agent phase, and one at timestep 0,
  the late phase): ``warmup`` untimed calls (on a compiled model, first one more call that
  compiles, timed apart and never counted), then ``repeats`` rounds; each round visits every
  candidate once, in an order that rotates from round to round, and times one call per phase
  (``torch.cuda.synchronize`` around each call on CUDA); the unpatched model is timed in both
  phases too, as the same call with either timestep;
- a candidate's seconds per step weight its two phase medians by the share of the denoiser calls
  of a whole ``num_inference_steps`` generation in the agent phase: ``config.phase_at(t)`` for
  every timestep of a copy of the pipeline's scheduler (``PNDMScheduler(skip_prk_steps=True,
  steps_offset=1)`` for a bare denoiser);
- the choice: the row with the fewest seconds per step, if it is patched and saves more than its
  noise, ``sqrt(spread_none**2 + spread**2)``, where a row's spread is the relative interquartile
  range of its per-round step samples; else None (no patch).

Results are cached as JSON (never pickled) per measurement key in :func:`cache_folder`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from .models import RECIPES
from .config import AgentSDConfig

logger = logging.getLogger(__name__)

#: Timesteps of the two timed calls: the noisiest (agent phase) and the last (late phase).
AGENT_TIMESTEP = 999
LATE_TIMESTEP = 0
#: Text tokens of a UNet's dummy ``encoder_hidden_states`` (CLIP's 77).
TEXT_TOKENS = 77
#: Version of the cache files' layout; a file of another version is ignored and rewritten.
CACHE_FORMAT = 1
#: The row of the unpatched model.
NO_PATCH = "no patch"
#: How a model is compiled: the whole denoiser (``torch.compile(unet)``, ``unet.compile()``) or
#: some of its submodules (``compile_repeated_blocks``); None when it is not.
CompileState = Literal["whole", "regional"]



# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class TuneRow:
    """One candidate of :func:`tune` and its timings.

    Attributes:
        name: ``"no patch"``, ``"merge"``, ``"pool"`` (:func:`default_candidates`) or, for other
            settings (stored with the model, or added by the caller), the reduction and the
            settings that differ from ``"merge"``'s (``"pool: ratio=0.5"``).
        settings: the candidate's settings; None for the unpatched model.
        agent_seconds: median seconds of one denoiser call in the agent phase (timestep 999).
        late_seconds: median seconds of one call in the late phase (timestep 0).
        agent_share: share of the generation's denoiser calls in the agent phase (its
            ``agent_fraction`` on the schedule); None for the unpatched model, whose two calls
            are the same.
        step_seconds: ``agent_share * agent_seconds + (1 - agent_share) * late_seconds``; for the
            unpatched model the mean of its two medians.
        spread: relative interquartile range of the per-round step samples (each round's two
            calls weighted as ``step_seconds``), ``(q75 - q25) / median``.
        speedup: ``step_seconds`` of the unpatched model divided by this row's.
        noise: ``sqrt(spread_none**2 + spread**2)``: the saving this row must exceed to be
            chosen; None for the unpatched model.
        compile_seconds: on a compiled model, the first call in each phase together (they
            compile), never counted in the medians; else None.
        agent_samples, late_samples: every timed call, seconds, in round order.
    """

    name: str
    settings: AgentSDConfig | None
    agent_seconds: float
    late_seconds: float
    agent_share: float | None
    step_seconds: float
    spread: float
    speedup: float
    noise: float | None
    compile_seconds: float | None
    agent_samples: tuple[float, ...]
    late_samples: tuple[float, ...]

    @property
    def saving(self) -> float:
        """Share of the unpatched model's seconds per step that this row saves: ``1 - 1 / speedup``."""
        return 1.0 - 1.0 / self.speedup

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-serialisable dict."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["settings"] = None if self.settings is None else self.settings.to_dict()
        data["agent_samples"], data["late_samples"] = list(self.agent_samples), list(self.late_samples)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TuneRow":
        """Inverse of :meth:`to_dict`.

        Raises:
            KeyError, TypeError, ValueError: for data that is not a row.
        """
        values = {f.name: data[f.name] for f in dataclasses.fields(cls)}
        if values["settings"] is not None:
            values["settings"] = AgentSDConfig.from_dict(values["settings"], source="the tune cache")
        values["agent_samples"] = tuple(float(x) for x in values["agent_samples"])
        values["late_samples"] = tuple(float(x) for x in values["late_samples"])
        for name in ("agent_seconds", "late_seconds", "step_seconds", "spread", "speedup"):
            values[name] = float(values[name])
        for name in ("agent_share", "noise", "compile_seconds"):
            values[name] = None if values[name] is None else float(values[name])
        if not isinstance(values["name"], str):
            raise TypeError("a row's name must be a string")
        return cls(**values)


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` measured, and its choice.

    Attributes:
        config: the fastest setting, or None when no candidate beats the unpatched model by more
            than its noise (then leave the model unpatched).
        rows: every candidate, the unpatched model first.
        device: where it was measured: ``torch.cuda.get_device_name``, or the CPU and its threads.
        dtype: the model's dtype, e.g. ``"float16"``.
        height, width: the image size in pixels.
        batch: the denoiser batch, ``num_images * (2 if guidance else 1)``.
        latent: the latent size ``(height, width) // vae_scale_factor``.
        denoiser: the denoiser's class name.
        compiled: ``"whole"``, ``"regional"`` or None (eager).
        compile_seconds: on a compiled model, every candidate's first calls together (see
            :attr:`TuneRow.compile_seconds`); else None.
        num_inference_steps: the steps of the generation whose schedule weights the two phases.
        scheduler: the class name of the scheduler that gave the schedule.
        repeats: timed rounds.
        warmup: untimed calls per candidate and phase before the rounds.
        versions: of ``torch``, ``diffusers`` and ``agentsd``.
        from_cache: whether this result was read from the cache (not compared by ``==``).
    """

    config: AgentSDConfig | None
    rows: tuple[TuneRow, ...]
    device: str
    dtype: str
    height: int
    width: int
    batch: int
    latent: tuple[int, int]
    denoiser: str
    compiled: CompileState | None
    compile_seconds: float | None
    num_inference_steps: int
    scheduler: str
    repeats: int
    warmup: int
    versions: Mapping[str, str]
    from_cache: bool = field(default=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(height, width, batch)``."""
        return self.height, self.width, self.batch

    @property
    def best(self) -> TuneRow:
        """The row with the fewest seconds per step (it may be the unpatched model, and it is
        :attr:`config` only when it also beats the noise)."""
        return min(self.rows, key=lambda row: row.step_seconds)

    def apply(self, model: Any) -> Any:
        """Patch ``model`` (a pipeline or its denoiser) with :attr:`config`, or remove any patch
        when it is None. Equivalent to ``if result.config is not None:
        agentsd.apply_patch(model, config=result.config)`` on an unpatched model. Returns ``model``."""
        from .patch import apply_patch, remove_patch

        if self.config is None:
            return remove_patch(model)
        return apply_patch(model, config=self.config)

    def describe(self) -> str:
        """One line: the measurement and its choice."""
        choice = self._choice_row()
        if choice is None:
            best = self.best
            what = ("no patch: the unpatched model is the fastest" if best.settings is None else
                    f"no patch: the fastest, {best.name} ({best.speedup:.2f}x), saves {best.saving:.1%}, "
                    f"within its noise of {best.noise:.1%}")
        else:
            what = (f"{choice.name}: {choice.speedup:.2f}x per step (saves {choice.saving:.1%}, "
                    f"noise {choice.noise:.1%})")
        mode = {"whole": "compiled", "regional": "compiled (regional)"}.get(self.compiled or "", "eager")
        return (f"{self.denoiser} at {self.height}x{self.width} px, batch {self.batch}, {self.dtype}, {mode}, "
                f"on {self.device}: {what}")

    def to_markdown(self) -> str:
        """The table of every candidate, with a header line and the choice."""
        mode = {"whole": "compiled (torch.compile of the denoiser)",
                "regional": "compiled (regional: compile_repeated_blocks)"}.get(self.compiled or "", "eager")
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        lines = [
            f"agentsd.tune: {self.denoiser}, {self.height}x{self.width} px (latent {self.latent[0]}x{self.latent[1]}), "
            f"batch {self.batch}, {self.dtype}, {mode}, on {self.device}; {self.num_inference_steps} steps of "
            f"{self.scheduler}; median of {self.repeats} interleaved rounds after {self.warmup} warm-up calls per "
            f"candidate and phase; "
            f"{versions}" + (" (from the cache)" if self.from_cache else ""),
            "",
        ]
        header = ["candidate", "agent-phase share", "agent phase s/call", "late phase s/call", "s/step",
                  "spread", "speed-up", "noise"]
        if self.compiled:
            header.append("first calls s (compile)")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            cells = [row.name, "–" if row.agent_share is None else f"{row.agent_share:.0%}",
                     _seconds(row.agent_seconds), _seconds(row.late_seconds), _seconds(row.step_seconds),
                     f"{row.spread:.1%}", f"{row.speedup:.2f}x", "–" if row.noise is None else f"{row.noise:.1%}"]
            if self.compiled:
                cells.append("–" if row.compile_seconds is None else f"{row.compile_seconds:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        choice = self._choice_row()
        lines += ["", f"choice: {choice.name}" if choice is not None else
                  "choice: no patch (nothing beats the unpatched model by more than the noise)"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def _choice_row(self) -> TuneRow | None:
        if self.config is None:
            return None
        return next(row for row in self.rows if row.settings == self.config)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-serialisable dict (what the cache stores)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "from_cache"}
        data["config"] = None if self.config is None else self.config.to_dict()
        data["rows"] = [row.to_dict() for row in self.rows]
        data["latent"] = list(self.latent)
        data["versions"] = dict(self.versions)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], from_cache: bool = False) -> "TuneResult":
        """Inverse of :meth:`to_dict`.

        Raises:
            KeyError, TypeError, ValueError: for data that is not a result.
        """
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name != "from_cache"}
        if values["config"] is not None:
            values["config"] = AgentSDConfig.from_dict(values["config"], source="the tune cache")
        values["rows"] = tuple(TuneRow.from_dict(row) for row in values["rows"])
        values["latent"] = tuple(int(x) for x in values["latent"])
        values["versions"] = {str(k): str(v) for k, v in dict(values["versions"]).items()}
        if values["compiled"] not in (None, "whole", "regional"):
            raise ValueError(f"compiled must be None, 'whole' or 'regional', got {values['compiled']!r}")
        if values["config"] is not None and values["config"] not in [row.settings for row in values["rows"]]:
            raise ValueError("the chosen config is not one of the rows")
        return cls(**values, from_cache=from_cache)


def _seconds(value: float) -> str:
    return f"{value:.4g}"


# ----------------------------------------------------------------------------- the model


class _Denoiser(NamedTuple):
    """What tune needs to know of a model."""

    #: what is called: the denoiser, or its ``torch.compile`` wrapper (so its graphs run)
    call: torch.nn.Module
    #: the denoiser itself
    module: torch.nn.Module
    #: the pipeline, or None for a bare denoiser
    pipeline: Any | None
    #: its family (:data:`agentsd.models.FAMILIES`): ``"unet"``, ``"pixart"`` or ``"sd3"``
    family: str
    #: the forward argument that holds the latents
    sample: str


def _denoiser_of(model: Any) -> _Denoiser:
    """The denoiser of ``model`` (a pipeline or a denoiser, ``torch.compile`` wrappers looked
    through), as :func:`agentsd.apply_patch` finds it."""
    from .models import denoiser_of

    try:
        module, family = denoiser_of(model)
    except TypeError as err:
        raise TypeError(f"agentsd.tune: {err}") from None
    if getattr(model, "_orig_mod", model) is module:
        return _Denoiser(model, module, None, family.name, family.sample)
    return _Denoiser(getattr(model, family.attribute), module, model, family.name, family.sample)


def compile_state(model: Any) -> CompileState | None:
    """How ``model`` (a pipeline or its denoiser) is compiled: ``"whole"`` for a
    ``torch.compile`` wrapper (``OptimizedModule``) or a denoiser compiled in place
    (``unet.compile()``), ``"regional"`` when some of its submodules are
    (``compile_repeated_blocks``), None when it is eager."""
    found = _denoiser_of(model)
    if isinstance(found.call, torch._dynamo.eval_frame.OptimizedModule) or \
            getattr(found.module, "_compiled_call_impl", None) is not None:
        return "whole"
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in found.module.modules()):
        return "regional"
    return None


def vae_scale_factor(model: Any) -> int:
    """Pixels per latent pixel: the pipeline's ``vae_scale_factor``, or 8 for a bare denoiser."""
    pipeline = _denoiser_of(model).pipeline
    factor = getattr(pipeline, "vae_scale_factor", None) if pipeline is not None else None
    return int(factor) if isinstance(factor, int) and factor > 0 else 8


def _patch_size(model: Any) -> int:
    """Latent pixels per token side of a transformer (its ``patch_size``); 1 for a UNet."""
    found = _denoiser_of(model)
    size = found.module.config.get("patch_size") if found.family != "unet" else None
    return int(size) if isinstance(size, int) and size > 0 else 1


def denoiser_inputs(
    model: Any,
    batch: int,
    latent: tuple[int, int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    text_tokens: int | None = None,
) -> dict[str, Any]:
    """Dummy keyword inputs of one denoiser call (all but the timestep), for timing.

    The one place that knows what each model family is conditioned on (a new family is a new
    branch here). The latents are ``(batch, in_channels, *latent)`` under the family's argument
    name, and:

    - ``unet`` (``UNet2DConditionModel``): ``encoder_hidden_states`` ``(batch, 77,
      cross_attention_dim)`` and, for SDXL-like UNets (``addition_embed_type == "text_time"``),
      ``added_cond_kwargs`` with ``text_embeds`` and ``time_ids`` whose sizes fill
      ``projection_class_embeddings_input_dim`` (6 time ids, or as many as the pipeline's
      ``text_encoder_2`` leaves room for);
    - ``pixart`` (``PixArtTransformer2DModel``): ``encoder_hidden_states`` ``(batch, 120,
      caption_channels)`` (300 tokens for a PixArt-Σ pipeline) and ``added_cond_kwargs`` with the
      resolution and aspect ratio when the model uses them (None values otherwise, as its pipeline
      passes);
    - ``sd3`` (``SD3Transformer2DModel``): ``encoder_hidden_states`` ``(batch, 77 + 256,
      joint_attention_dim)`` (CLIP and T5 tokens, as its pipeline) and ``pooled_projections``
      ``(batch, pooled_projection_dim)``.

    Args:
        model: a pipeline or its denoiser.
        batch: the denoiser batch.
        latent: the latent height and width.
        device, dtype: default: the denoiser's own.
        seed: of the random values (a private generator: the global RNG is untouched).
        text_tokens: the prompt length, instead of the family's (e.g. 300 for a bare PixArt-Σ).

    Raises:
        TypeError: for a denoiser whose conditioning this function cannot build.
    """
    found = _denoiser_of(model)
    base, pipeline, cfg = found.module, found.pipeline, found.module.config
    device = base.device if device is None else torch.device(device)
    dtype = base.dtype if dtype is None else dtype
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    inputs: dict[str, Any] = {found.sample: randn(batch, cfg.in_channels, *latent)}
    if found.family == "pixart":
        tokens = text_tokens or (300 if "Sigma" in type(pipeline).__name__ else 120)
        inputs["encoder_hidden_states"] = randn(batch, tokens, int(cfg.caption_channels))
        if getattr(base, "use_additional_conditions", False):
            f = vae_scale_factor(model)
            resolution = torch.tensor([[latent[0] * f, latent[1] * f]] * batch, device=device, dtype=dtype)
            aspect = torch.tensor([[latent[0] / latent[1]]] * batch, device=device, dtype=dtype)
            inputs["added_cond_kwargs"] = {"resolution": resolution, "aspect_ratio": aspect}
        else:
            inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return inputs
    if found.family == "sd3":
        inputs["encoder_hidden_states"] = randn(batch, text_tokens or 77 + 256, int(cfg.joint_attention_dim))
        inputs["pooled_projections"] = randn(batch, int(cfg.pooled_projection_dim))
        return inputs
    if found.family != "unet":
        raise TypeError(f"agentsd.tune cannot build dummy inputs for the {found.family} family yet")
    unsupported = [f"{name}={cfg.get(name)!r}" for name in ("class_embed_type", "encoder_hid_dim_type")
                   if cfg.get(name) not in (None, "text_proj")]
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        unsupported.append(f"addition_embed_type={cfg.get('addition_embed_type')!r}")
    if unsupported:
        raise TypeError(f"agentsd.tune cannot build dummy inputs for a {type(base).__name__} with "
                        f"{', '.join(unsupported)}; it supports text-conditioned UNets (SD 1.x/2.x, SDXL)")
    text_dim = cfg.get("encoder_hid_dim") if cfg.get("encoder_hid_dim_type") == "text_proj" else cfg.cross_attention_dim
    if isinstance(text_dim, (list, tuple)):
        text_dim = text_dim[0]
    inputs["encoder_hidden_states"] = randn(batch, text_tokens or TEXT_TOKENS, int(text_dim))
    if cfg.get("addition_embed_type") == "text_time":
        total, per_id = int(cfg.projection_class_embeddings_input_dim), int(cfg.addition_time_embed_dim)
        pooled = getattr(getattr(getattr(pipeline, "text_encoder_2", None), "config", None), "projection_dim", None)
        ids = 6  # SDXL's original size, crop and target size (the refiner's 5 fill the same width)
        if isinstance(pooled, int) and 0 < pooled < total and (total - pooled) % per_id == 0:
            ids = (total - pooled) // per_id
        if total - ids * per_id <= 0:
            raise TypeError(f"agentsd.tune cannot split projection_class_embeddings_input_dim={total} into pooled "
                            f"text embeddings and time ids of {per_id}")
        inputs["added_cond_kwargs"] = {"text_embeds": randn(batch, total - ids * per_id),
                                       "time_ids": randn(batch, ids).abs().mul(1024)}
    return inputs


def _execution_device(base: torch.nn.Module, pipeline: Any | None) -> torch.device:
    if pipeline is not None:
        with contextlib.suppress(Exception):  # offloaded pipelines run the denoiser elsewhere
            device = pipeline._execution_device
            if isinstance(device, torch.device):
                return device
    return base.device


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU and its thread count: where the timings are taken."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"{platform.processor() or platform.machine()} CPU, {threads} thread{'s' if threads != 1 else ''}"
    return device.type


def _synchronizer(device: torch.device) -> Any:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None) if device.type != "cpu" else None
    return sync if callable(sync) else (lambda: None)


def schedule_timesteps(model: Any, num_inference_steps: int) -> tuple[list[float], str]:
    """The timesteps of the denoiser calls of a ``num_inference_steps`` generation, and the
    scheduler's class name: from a copy of the pipeline's scheduler (made from its config; the
    pipeline's own is untouched), or ``PNDMScheduler(skip_prk_steps=True, steps_offset=1)`` for a
    bare denoiser or a scheduler that cannot set its timesteps alone (logged)."""
    from diffusers import PNDMScheduler

    pipeline = _denoiser_of(model).pipeline
    own = getattr(pipeline, "scheduler", None) if pipeline is not None else None
    if own is not None and hasattr(own, "set_timesteps") and hasattr(own, "config"):
        try:
            scheduler = type(own).from_config(own.config)
            scheduler.set_timesteps(num_inference_steps)
            return [float(t) for t in scheduler.timesteps], type(own).__name__
        except Exception as err:  # noqa: BLE001 - e.g. a flow-matching scheduler that needs `mu`
            logger.warning("agentsd.tune: a copy of the pipeline's %s did not set %d timesteps (%s); the phases "
                           "are weighted by a PNDM schedule instead", type(own).__name__, num_inference_steps, err)
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    scheduler.set_timesteps(num_inference_steps)
    return [float(t) for t in scheduler.timesteps], type(scheduler).__name__


def agent_share(config: AgentSDConfig, timesteps: Sequence[float]) -> float:
    """Share of ``timesteps`` whose calls run ``config``'s agent phase (:meth:`AgentSDConfig.phase_at`)."""
    return sum(config.phase_at(t) is config.agent_phase for t in timesteps) / len(timesteps)


# ----------------------------------------------------------------------------- the cache


def cache_folder() -> Path:
    """The default cache folder: ``$AGENTSD_CACHE`` if set, else ``$XDG_CACHE_HOME/agentsd/tune``,
    else ``~/.cache/agentsd/tune``."""
    if os.environ.get("AGENTSD_CACHE"):
        return Path(os.environ["AGENTSD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "agentsd" / "tune"


def _json_part(value: Any) -> Any:
    """The JSON-serialisable part of ``value``: private keys (``_name_or_path``, ...) and values
    JSON cannot hold are left out, tuples become lists."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(k, str) and not k.startswith("_"):
                part = _json_part(v)
                if part is not _SKIP:
                    out[k] = part
        return out
    if isinstance(value, (list, tuple)):
        parts = [_json_part(v) for v in value]
        return _SKIP if any(p is _SKIP for p in parts) else parts
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return _SKIP


_SKIP = object()


def _cache_key(**parts: Any) -> tuple[dict[str, Any], str]:
    """The key (as stored in the file) and its SHA-256."""
    key = json.loads(json.dumps(parts, sort_keys=True))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return key, digest


def _read_cache(path: Path, key: dict[str, Any]) -> TuneResult | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a format-{CACHE_FORMAT} tune cache file")
        if data.get("key") != key:
            raise ValueError("its key is not this measurement's")
        return TuneResult.from_dict(data["result"], from_cache=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        logger.warning("agentsd.tune: ignoring the unreadable cache file %s (%s: %s); it will be rewritten",
                       path, type(err).__name__, err)
        return None


def _write_cache(path: Path, key: dict[str, Any], result: TuneResult) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"format": CACHE_FORMAT, "key": key, "result": result.to_dict()}, indent=1))
        os.replace(temporary, path)
    except OSError as err:
        logger.warning("agentsd.tune: could not write the cache file %s: %s", path, err)


# ----------------------------------------------------------------------------- measuring


class _Quiet(logging.Filter):
    """While tune switches patches: the patch's INFO line of every ``apply_patch`` is dropped, and
    each warning is logged once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextlib.contextmanager
def _quiet_patching() -> Iterator[None]:
    quiet = _Quiet()
    loggers = [logging.getLogger(name) for name in ("agentsd.patch", "agentsd.hooks")]
    for log in loggers:
        log.addFilter(quiet)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(quiet)


def _dynamo_limits(compiled: bool) -> contextlib.AbstractContextManager:
    """While timing a compiled model: dynamo's recompile limits raised, so that every candidate's
    graphs stay cached side by side (a hit limit would silently fall back to eager), and no
    automatic dynamic shapes, so that each candidate gets graphs specialised to its settings, as
    it would alone (the settings of the second candidate would otherwise be traced as symbols:
    slower graphs, and compilations of minutes)."""
    if not compiled:
        return contextlib.nullcontext()
    config = torch._dynamo.config
    limits = {name: max(getattr(config, name), value) for name, value in
              (("recompile_limit", 1024), ("cache_size_limit", 1024), ("accumulated_recompile_limit", 8192),
               ("accumulated_cache_size_limit", 8192)) if hasattr(config, name)}
    return config.patch(automatic_dynamic_shapes=False, **limits)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="agentsd.tune", unit="call")


def _quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _relative_iqr(values: Sequence[float]) -> float:
    median = _quantile(values, 0.5)
    return (_quantile(values, 0.75) - _quantile(values, 0.25)) / median if median > 0 else 0.0


def _row(name: str, settings: AgentSDConfig | None, share: float | None, agent: list[float], late: list[float],
         compile_seconds: float | None) -> dict[str, Any]:
    weight = 0.5 if share is None else share
    agent_median, late_median = _quantile(agent, 0.5), _quantile(late, 0.5)
    steps = [weight * a + (1 - weight) * b for a, b in zip(agent, late)]
    return dict(name=name, settings=settings, agent_seconds=agent_median, late_seconds=late_median,
                agent_share=share, step_seconds=weight * agent_median + (1 - weight) * late_median,
                spread=_relative_iqr(steps), compile_seconds=compile_seconds,
                agent_samples=tuple(agent), late_samples=tuple(late))


def _choose(rows: Sequence[TuneRow]) -> AgentSDConfig | None:
    """The fastest row's settings if it is patched and saves more than its noise, else None."""
    best = min(rows, key=lambda row: row.step_seconds)
    if best.settings is None or best.noise is None or not best.saving > best.noise:
        return None
    return best.settings


def default_candidates(model: Any) -> list[tuple[str, AgentSDConfig | None]]:
    """The candidates :func:`tune` always times, as ``[(name, settings)]``: no patch (None);
    ``"merge"`` and ``"pool"``, what ``apply_patch(model, reduction=...)`` runs on a model without
    stored settings (the defaults, under the family's recipe, :data:`agentsd.models.RECIPES`); and,
    when the model has settings stored with it (:func:`agentsd.store_config`), what
    ``apply_patch(model)`` runs, if it differs."""
    from .patch import CONFIG_KEY, resolve_config

    found = _denoiser_of(model)
    # what apply_patch runs on this model without its stored settings: the family's recipe, with
    # each reduction
    recipe = RECIPES.get(found.family, {})
    merge, pool = (resolve_config(model, config=AgentSDConfig(**{**recipe, "reduction": reduction}))
                   for reduction in ("merge", "pool"))
    candidates: list[tuple[str, AgentSDConfig | None]] = [(NO_PATCH, None), ("merge", merge), ("pool", pool)]
    if found.module.config.get(CONFIG_KEY):
        _add(candidates, resolve_config(model))
    return candidates


def _add(candidates: list[tuple[str, AgentSDConfig | None]], config: AgentSDConfig) -> None:
    """Append ``config`` unless it is there already, named after how it differs from ``"merge"``
    (with its reduction): ``"pool: ratio=0.5"``."""
    if any(config == settings for _, settings in candidates):
        return
    reference = dataclasses.replace(candidates[1][1], reduction=config.reduction)
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
               if f.name != "reduction" and getattr(config, f.name) != getattr(reference, f.name)]
    candidates.append((f"{config.reduction}: {', '.join(changed)}", config))


def _candidates(model: Any, extra: Any) -> list[tuple[str, AgentSDConfig | None]]:
    """``[(name, settings)]``: :func:`default_candidates` and the caller's, without repeats."""
    from .patch import SETTINGS

    found = default_candidates(model)
    if extra is None:
        return found
    if isinstance(extra, (str, bytes, Mapping, AgentSDConfig)) or not isinstance(extra, Sequence):
        raise TypeError("candidates must be None or a list of AgentSDConfig or dicts of apply_patch settings, got "
                        f"{type(extra).__name__}")
    for index, item in enumerate(extra):
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - set(SETTINGS))
            if unknown:
                raise TypeError(f"candidates[{index}]: unknown setting(s) {unknown}; valid: {sorted(SETTINGS)}")
            try:
                config = AgentSDConfig(**item)
            except (TypeError, ValueError) as err:
                raise type(err)(f"candidates[{index}]: {err}") from None
        elif isinstance(item, AgentSDConfig):
            config = item
        else:
            raise TypeError(f"candidates[{index}] must be an AgentSDConfig or a dict of apply_patch settings, "
                            f"got {type(item).__name__}")
        _add(found, config)
    return found


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def tune(
    model: Any,
    height: int,
    width: int,
    *,
    num_images: int = 1,
    guidance: bool = True,
    num_inference_steps: int = 50,
    candidates: Sequence[AgentSDConfig | Mapping[str, Any]] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
) -> TuneResult:
    """Time AgentSD's settings on this device, at this size, and pick the fastest one, or none.

    ``result = agentsd.tune(pipe, height=1024, width=1024); result.apply(pipe)`` patches the
    pipeline with the fastest setting, or leaves it unpatched when nothing beats the unpatched
    model by more than the measured noise. The same as ``if result.config is not None:
    agentsd.apply_patch(pipe, config=result.config)`` on an unpatched pipeline.

    Every candidate is timed on the model itself, in both phases of the patch (a denoiser call at
    timestep 999 and one at 0), on dummy inputs of this shape (:func:`denoiser_inputs`): ``warmup``
    untimed calls, then ``repeats`` interleaved rounds (candidate order rotating), medians. The
    phases are weighted by the share of the calls of a ``num_inference_steps`` generation, on the
    pipeline's own schedule, that run the agent phase. The choice is the fastest row if it is patched
    and saves more than its noise, else None. The method and the noise rule: ``docs/tune.md``.

    The model is left as it was found: patched with the same settings, or unpatched; its
    scheduler, processors and the global RNG are untouched. The timed calls run under
    ``torch.inference_mode()``.

    Args:
        model: what :func:`~agentsd.apply_patch` takes: a diffusers pipeline of a supported
            family (SD 1.x/2.x and SDXL UNets, PixArt-α/Σ and SD3/SD3.5 transformers) or its
            denoiser; either may be compiled (``pipe.unet = torch.compile(pipe.unet)`` or
            ``pipe.unet.compile_repeated_blocks(...)``): the first call of each candidate then
            compiles; it is timed apart (``compile_seconds``) and never counted.
        height: image height in pixels, a positive multiple of the pipeline's ``vae_scale_factor``
            (8 for Stable Diffusion and for a bare denoiser) times a transformer's patch size.
        width: image width in pixels, likewise.
        num_images: images per denoiser call, >= 1; default 1.
        guidance: classifier-free guidance (the denoiser batch is ``2 * num_images``); default True.
        num_inference_steps: steps of the generation whose schedule weights the phases, >= 1; default 50.
        candidates: settings to time besides the defaults (:func:`default_candidates`: no patch,
            ``reduction="merge"`` and ``reduction="pool"`` as ``apply_patch`` runs them on this
            model's family, and the settings stored with the model, if any): a list of
            :class:`~agentsd.config.AgentSDConfig` or of dicts of :func:`~agentsd.apply_patch`
            settings, e.g. ``[{"ratio": 0.6}, {"reduction": "pool", "agent_fraction": 1.0}]``.
        repeats: timed rounds, >= 1; default 5. The noise is measured from their spread, so use
            at least 3 (with 1 the spread is 0 and any gain counts).
        warmup: untimed calls per candidate and phase before the rounds, >= 0; default 2.
        cache: True (default): read and write results in :func:`cache_folder`; a folder (``str``
            or path): there; False: neither read nor write. A result is reused only for the same
            device, denoiser class and config, size, batch, dtype, compile state, schedule,
            candidates, repeats, warm-up and torch / diffusers / agentsd versions.
        progress: show a progress bar (tqdm, when installed); default True.

    Returns:
        A :class:`TuneResult`: the choice (``config``), every row, where and how it was measured.
        ``print(result)`` shows the table.

    Raises:
        TypeError: for a model that is not supported or an argument of the wrong type.
        ValueError: for an argument out of its range (the message names it and the range), or a
            candidate the model cannot be patched with. Both before anything is timed.
    """
    from diffusers import __version__ as diffusers_version

    from . import __version__ as agentsd_version
    from .patch import apply_patch, patch_config, remove_patch

    found = _denoiser_of(model)
    call, base, pipeline = found.call, found.module, found.pipeline
    factor, patch = vae_scale_factor(model), _patch_size(model)
    for name, value in (("height", height), ("width", width)):
        _check_int(name, value, 1)
        if value % (factor * patch):
            what = f"the vae_scale_factor {factor} times the patch size {patch}" if patch > 1 else \
                "the vae_scale_factor"
            raise ValueError(f"{name} must be a positive multiple of {factor * patch} ({what}), got {value}")
    _check_int("num_images", num_images, 1)
    _check_bool("guidance", guidance)
    _check_int("num_inference_steps", num_inference_steps, 1)
    _check_int("repeats", repeats, 1)
    _check_int("warmup", warmup, 0)
    _check_bool("progress", progress)
    if isinstance(cache, bool):
        folder = cache_folder() if cache else None
    elif isinstance(cache, (str, os.PathLike)):
        folder = Path(cache).expanduser()
    else:
        raise TypeError(f"cache must be a bool or a folder (str or path), got {type(cache).__name__}")
    rows_to_time = _candidates(model, candidates)

    batch = num_images * (2 if guidance else 1)
    latent = (height // factor, width // factor)
    device = _execution_device(base, pipeline)
    if device.type == "meta":
        raise ValueError("the model's weights are on the meta device; load them before agentsd.tune")
    dtype = base.dtype
    compiled = compile_state(model)
    timesteps, scheduler_name = schedule_timesteps(model, num_inference_steps)
    shares = {name: None if config is None else agent_share(config, timesteps) for name, config in rows_to_time}
    versions = {"torch": torch.__version__, "diffusers": diffusers_version, "agentsd": agentsd_version}
    where = device_name(device)

    key, digest = _cache_key(
        format=CACHE_FORMAT, device=where, device_type=device.type,
        denoiser=f"{type(base).__module__}.{type(base).__qualname__}", denoiser_config=_json_part(dict(base.config)),
        height=height, width=width, batch=batch, latent=latent, dtype=str(dtype).removeprefix("torch."),
        compiled=compiled, num_inference_steps=num_inference_steps, scheduler=scheduler_name,
        timesteps=[round(t, 6) for t in timesteps],
        candidates=[[name, None if config is None else config.to_dict()] for name, config in rows_to_time],
        repeats=repeats, warmup=warmup, versions=versions,
    )
    path = None if folder is None else folder / f"{digest[:40]}.json"
    if path is not None:
        cached = _read_cache(path, key)
        if cached is not None:
            logger.info("agentsd.tune (from the cache %s): %s", path, cached.describe())
            return cached

    inputs = denoiser_inputs(model, batch, latent, device=device, dtype=dtype)
    earlier = patch_config(base)
    sync = _synchronizer(device)
    # one timestep per sample, a view of one value, as the pipelines pass it (``t.expand(batch)``)
    steps = {phase: torch.tensor(float(t), device=device).expand(batch)
             for phase, t in (("agent", AGENT_TIMESTEP), ("late", LATE_TIMESTEP))}
    samples = {name: {"agent": [], "late": []} for name, _ in rows_to_time}
    first_calls: dict[str, float] = {}
    calls_per_candidate = 2 * (warmup + repeats + (1 if compiled else 0))
    bar = None

    def enter(config: AgentSDConfig | None) -> None:
        if config is None:
            remove_patch(base)
        else:
            apply_patch(base, config=config)

    def timed(phase: str) -> float:
        sync()
        start = time.perf_counter()
        call(**inputs, timestep=steps[phase], return_dict=False)
        sync()
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.update()
        return seconds

    rng_devices = [device] if device.type == "cuda" else []
    try:
        with _quiet_patching(), _dynamo_limits(compiled is not None), torch.random.fork_rng(rng_devices), \
                torch.inference_mode():
            for _, config in rows_to_time:  # every candidate fits this model, before anything is timed
                enter(config)
            bar = _progress_bar(calls_per_candidate * len(rows_to_time), progress)
            for name, config in rows_to_time:  # warm-up: compilation, allocations, kernel selection
                enter(config)
                for phase in ("agent", "late"):
                    if compiled:
                        first_calls[name] = first_calls.get(name, 0.0) + timed(phase)
                    for _ in range(warmup):
                        timed(phase)
            for round_index in range(repeats):
                shift = round_index % len(rows_to_time)
                phases = ("agent", "late") if round_index % 2 == 0 else ("late", "agent")
                for name, config in rows_to_time[shift:] + rows_to_time[:shift]:
                    enter(config)
                    for phase in phases:
                        samples[name][phase].append(timed(phase))
    finally:
        with _quiet_patching():
            remove_patch(base)
            if earlier is not None:
                apply_patch(base, config=earlier)
        if bar is not None:
            bar.close()

    raw = [_row(name, config, shares[name], samples[name]["agent"], samples[name]["late"], first_calls.get(name))
           for name, config in rows_to_time]
    reference = raw[0]
    rows = tuple(TuneRow(**row, speedup=reference["step_seconds"] / row["step_seconds"],
                         noise=None if row["settings"] is None else math.hypot(reference["spread"], row["spread"]))
                 for row in raw)
    result = TuneResult(
        config=_choose(rows), rows=rows, device=where, dtype=str(dtype).removeprefix("torch."), height=height,
        width=width, batch=batch, latent=latent, denoiser=type(base).__name__, compiled=compiled,
        compile_seconds=sum(first_calls.values()) if compiled else None, num_inference_steps=num_inference_steps,
        scheduler=scheduler_name, repeats=repeats, warmup=warmup, versions=versions,
    )
    if path is not None:
        _write_cache(path, key, result)
    logger.info("agentsd.tune: %s", result.describe())
    return result


__all__ = ["TuneResult", "TuneRow", "cache_folder", "compile_state", "default_candidates", "denoiser_inputs", "tune"]

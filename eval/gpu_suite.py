"""Every GPU table from one unattended run (``scripts/benchmark_gpu.py``).

The run is a list of *jobs*, ordered by what their figures are worth, each one table:

- ``sync``: does any UNet call of a patched model (its hook included) make the host wait for the
  device? ``torch.cuda.set_sync_debug_mode("error")`` around a call at a timestep taken from a
  device-side schedule, as diffusers' loops pass it.
- ``step``: one denoiser step, SD1.5 or SDXL UNet or PixArt-Σ or SD3.5-medium transformer
  architecture (random weights; the transformers in bf16), at a size and batch, ``eager``,
  ``regional`` (``compile_repeated_blocks(fullgraph=True)``) or ``cudagraphs`` (the whole denoiser
  under ``torch.compile(mode="reduce-overhead")``). Methods are interleaved sample by sample; a
  sample is the mean of ``inner`` calls; the row is the median of ``repeats`` samples.
- ``generation``: whole generations (text encoder, 25 denoising steps with guidance, VAE) of a
  random-weight SD1.5 pipeline, eager or with the UNet under CUDA graphs, interleaved, medians.
- ``tune``: what ``agentsd.tune`` picks for a denoiser at a size (no patch, merge, pool; its table).

Every row has its peak memory and, when compiled, the seconds its first (compiling) calls took.
A method that fails becomes a row with the first line of its error. Each job's table is written
to ``OUT/<job>.json`` and ``.md`` when it is done, and ``OUT/summary.md`` lists every table, the
machine and versions, and what was skipped. A rerun skips finished jobs; a job that was cut off
runs again from its start, so that its rows stay side by side in one process. Jobs that would
start after the time budget is spent are skipped and named.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from agentsd.config import DEFAULT_RATIO
from agentsd.tuning import denoiser_inputs
from eval import REFERENCE_MODEL, runtime
from eval.latency import MODELS, PIXART_SIGMA_CONFIG, SD15_UNET_CONFIG, SD35_MEDIUM_CONFIG
from eval.methods import Method, Options, build_methods, per_step
from eval.report import add_shares, fmt

STEP_METHODS = ("sd", "tomesd", "todo", "agentsd", "agentsd-pool", "bound")
#: a transformer's rows (tomesd patches UNets only)
DIT_METHODS = ("sd", "todo", "agentsd", "agentsd-pool", "bound")
#: the transformers of the step jobs
TRANSFORMERS = ("pixart-sigma", "sd35-medium")
GENERATION_METHODS = ("sd", "tomesd", "todo", "agentsd", "agentsd-pool", "deepcache", "agentsd+deepcache",
                      "agentsd-pool+deepcache", "bound", "bound+deepcache")
SYNC_METHODS = ("sd", "agentsd", "agentsd-pool", "agentsd:late", "agentsd-pool:late")
#: SDXL's UNet (2.6 B parameters): attention at levels 2 and 4, added text-time conditions.
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
#: Tiny stand-ins of the same kinds of UNet for ``--smoke`` (the same code path in seconds).
_TINY = dict(layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, sample_size=16)
TINY = {
    "sd15": dict(_TINY, block_out_channels=(16, 32), attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(SDXL_UNET_CONFIG, **_TINY, block_out_channels=(16, 32, 32), attention_head_dim=(2, 4, 4),
                 transformer_layers_per_block=(1, 1, 2), addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32),
    "pixart-sigma": dict(PIXART_SIGMA_CONFIG, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                         caption_channels=32, cross_attention_dim=16, sample_size=8),
    "sd35-medium": dict(SD35_MEDIUM_CONFIG, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                        dual_attention_layers=(0,), pos_embed_max_size=32, sample_size=8),
}


@dataclass(frozen=True)
class Job:
    """One table: what is timed (``kind``), on which UNet, at which size, batch and mode."""

    kind: str
    arch: str = "sd15"
    size: int = 512
    batch: int = 2
    mode: str = "eager"
    methods: tuple[str, ...] = STEP_METHODS
    #: the job's dtype, instead of the run's (the transformers run in bf16)
    dtype: str | None = None

    @property
    def name(self) -> str:
        if self.kind == "sync":
            return "sync"
        return f"{self.kind}_{self.arch}_{self.size}px_b{self.batch}_{self.mode}"


def _dit(arch: str, size: int, batch: int = 2, mode: str = "eager") -> Job:
    return Job("step", arch=arch, size=size, batch=batch, mode=mode, methods=DIT_METHODS, dtype="bf16")


def plan(smoke: bool = False) -> list[Job]:
    """The jobs, most valuable first: the sync check, the eager steps (cheap), CUDA graphs at
    512 px batch 2 and at 1024 px, whole generations, SDXL, then the other compiled steps."""
    if smoke:  # every kind and mode, fewer methods where each one compiles
        few = ("sd", "agentsd-pool")
        return [Job("sync", methods=SYNC_METHODS), Job("step", size=64), Job("step", size=64, mode="cudagraphs", methods=few),
                Job("step", size=64, mode="regional", methods=few),
                Job("generation", size=64, batch=1, methods=GENERATION_METHODS),
                Job("generation", size=64, batch=1, mode="cudagraphs", methods=few),
                Job("step", arch="sdxl", size=64, methods=few),
                *(replace(_dit(arch, 64), dtype=None) for arch in TRANSFORMERS),
                Job("tune", size=64, methods=()), Job("tune", arch="pixart-sigma", size=64, methods=())]
    gen = dict(batch=1, methods=GENERATION_METHODS)
    return [
        Job("sync", methods=SYNC_METHODS),
        *(Job("step", size=s, batch=b) for s in (512, 1024) for b in (2, 8)),
        Job("step", size=512, mode="cudagraphs"), Job("step", size=1024, mode="cudagraphs"),
        _dit("pixart-sigma", 1024), _dit("pixart-sigma", 2048), _dit("sd35-medium", 1024),
        # what agentsd.tune picks at each size of the tables
        *(Job("tune", arch=a, size=s, methods=()) for a, s in (("sd15", 512), ("sd15", 1024), ("sdxl", 1024))),
        *(replace(_dit(a, s), kind="tune", methods=()) for a, s in (("pixart-sigma", 1024), ("pixart-sigma", 2048),
                                                                     ("sd35-medium", 1024))),
        Job("generation", size=512, **gen), Job("generation", size=512, mode="cudagraphs", **gen),
        Job("generation", size=1024, **gen), Job("generation", size=1024, mode="cudagraphs", **gen),
        Job("step", arch="sdxl", size=1024), Job("step", arch="sdxl", size=1024, mode="cudagraphs"),
        Job("step", size=512, mode="regional"), Job("step", size=1024, mode="regional"),
        Job("step", size=512, batch=8, mode="cudagraphs"), Job("step", size=1024, batch=8, mode="cudagraphs"),
        _dit("pixart-sigma", 1024, mode="cudagraphs"), _dit("pixart-sigma", 2048, mode="cudagraphs"),
        _dit("sd35-medium", 1024, mode="cudagraphs"),
    ]


@dataclass(frozen=True)
class Settings:
    """How the jobs measure: device, dtype, samples per row, calls per sample, denoising steps of
    a generation, the time budget and the compile backend (``inductor``; ``aot_eager`` traces
    alike without generating code, for ``--smoke``)."""

    device: str = "cuda"
    dtype: str = "fp16"
    repeats: int = 10
    inner: int = 10
    steps: int = 25
    budget_s: float = 480.0
    backend: str = "inductor"
    smoke: bool = False


def machine(settings: Settings) -> dict[str, Any]:
    """Where and with what the tables were measured."""
    import diffusers

    info = dict(device=runtime.machine_name(settings.device), torch=torch.__version__, diffusers=diffusers.__version__,
                python=platform.python_version(), dtype=settings.dtype, backend=settings.backend)
    if torch.device(settings.device).type == "cuda":
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    capability=".".join(map(str, torch.cuda.get_device_capability())))
    return info


# ----------------------------------------------------------------------------- models and inputs


def build_unet(arch: str, settings: Settings, dtype: str | None = None) -> Any:
    """The denoiser ``arch`` (``sd15``, ``sdxl``, or a transformer of :data:`TRANSFORMERS`) with
    random weights, in ``dtype`` (default: the run's)."""
    from diffusers import UNet2DConditionModel

    cls = MODELS[arch][0] if arch in TRANSFORMERS else UNet2DConditionModel
    full = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG, **{a: MODELS[a][1] for a in TRANSFORMERS}}
    config = TINY[arch] if settings.smoke else full[arch]
    torch.manual_seed(0)
    with torch.device(settings.device):
        unet = cls(**config)
    return unet.to(runtime.DTYPES[dtype or settings.dtype]).eval()


def unet_inputs(unet: Any, job: Job, settings: Settings) -> tuple[tuple, dict[str, Any]]:
    """Positional ``(sample, t, text)`` and keyword inputs of one UNet call (``t`` is set per call)."""
    g = torch.Generator().manual_seed(0)
    dtype, device, config = runtime.DTYPES[settings.dtype], settings.device, unet.config
    latent = job.size // 8
    sample = torch.randn(job.batch, 4, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(job.batch, 77, config.cross_attention_dim, generator=g).to(device, dtype)
    kwargs: dict[str, Any] = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(job.batch, pooled, generator=g).to(device, dtype),
            time_ids=torch.tensor([[job.size, job.size, 0, 0, job.size, job.size]] * job.batch).to(device, dtype))
    return (sample, text), kwargs


def schedule(settings: Settings) -> torch.Tensor:
    """A 50-step schedule on the device; diffusers' loops pass ``t = timesteps[i]`` from it."""
    return torch.linspace(981, 1, 50, device=settings.device).round()


def build_pipeline(settings: Settings) -> Any:
    """A text-to-image pipeline for the generation jobs: SD1.5's architecture with random weights
    (the embedded reference model for ``--smoke``)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    dtype = runtime.DTYPES[settings.dtype]
    if settings.smoke:
        pipe = StableDiffusionPipeline.from_pretrained(REFERENCE_MODEL, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    else:
        torch.manual_seed(0)
        tokenizer = CLIPTokenizer.from_pretrained(REFERENCE_MODEL, subfolder="tokenizer")
        with torch.device(settings.device):
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None,
            scheduler=PNDMScheduler.from_pretrained(REFERENCE_MODEL, subfolder="scheduler"),
            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(settings.device, dtype)


# ----------------------------------------------------------------------------- timing


def _sync(settings: Settings) -> None:
    if torch.device(settings.device).type == "cuda":
        torch.cuda.synchronize()


def _compiled(model: Any, mode: str, settings: Settings) -> Any:
    """``model`` as the mode runs it: itself (``eager``, and ``regional``, whose blocks are compiled
    in place before each method) or the whole UNet under ``torch.compile`` with CUDA graphs."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    if mode != "cudagraphs":
        return model
    if settings.backend == "inductor":
        return torch.compile(model, mode="reduce-overhead")
    return torch.compile(model, backend=settings.backend)


def _mark_step() -> None:
    if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()  # outputs of the last replay may be overwritten


def _measure(methods: list[Method], enter: Callable[[Method], None], leave: Callable[[Method], None],
             call: Callable[[], Any], settings: Settings, inner: int) -> list[dict[str, Any]]:
    """Warm each method up (untimed, its compile seconds kept), then time samples of ``inner``
    calls, interleaved across the methods; a method that fails is a row with its error."""
    rows = {m.key: dict(method=m.name, ratio=m.ratio, phase=m.phase, key=m.key, bound=m.bound,
                        baseline=m.baseline, samples=[]) for m in methods}
    live = []
    for m in methods:
        row = rows[m.key]
        try:
            enter(m)
            start = time.perf_counter()
            for _ in range(2):
                _mark_step()
                call()
            _sync(settings)
            row["first_calls_s"] = time.perf_counter() - start
            with runtime.PeakMemory(settings.device) as mem:
                _mark_step()
                call()
            row["peak_mb"] = mem.peak_mb
            live.append(m)
        except Exception as err:  # noqa: BLE001 - any failure is a row, never the end of the run
            row["error"] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        finally:
            leave(m)
    for _ in range(settings.repeats):
        for m in live:
            enter(m)
            _sync(settings)
            start = time.perf_counter()
            for _ in range(inner):
                _mark_step()
                call()
            _sync(settings)
            rows[m.key]["samples"].append((time.perf_counter() - start) / inner)
            leave(m)
    for row in rows.values():
        row["median_s"] = statistics.median(row["samples"]) if row["samples"] else None
    return add_shares(list(rows.values()), "median_s")


def run_step_job(job: Job, settings: Settings) -> list[dict[str, Any]]:
    unet = build_unet(job.arch, settings, job.dtype)
    timesteps = schedule(settings)
    model = _compiled(unet, job.mode, settings)
    if job.arch in TRANSFORMERS:  # keyword inputs, one timestep per sample, as their pipelines pass them
        inputs = denoiser_inputs(unet, job.batch, (job.size // 8,) * 2, text_tokens=MODELS[job.arch][2])

        def call() -> Any:
            return model(**inputs, timestep=timesteps[10].expand(job.batch))
    else:
        (sample, text), kwargs = unet_inputs(unet, job, settings)

        def call() -> Any:
            return model(sample, timesteps[10], text, **kwargs)
    methods = _with_pool_default(build_methods(job.methods, [0.4], per_step(Options(phase="agent"))))

    def enter(m: Method) -> None:
        if job.mode == "regional":
            runtime.compile_blocks(unet, fullgraph=True, backend=settings.backend)
        m.apply(unet)

    with torch.inference_mode():
        return _measure(methods, enter, lambda m: m.remove(unet), call, settings, settings.inner)


def _with_pool_default(methods: list[Method]) -> list[Method]:
    """agentsd-pool at its own default ratio (keys and values pooled 2x2), the others as given."""
    pool = DEFAULT_RATIO["pool"]
    return [m if m.spec.name != "agentsd-pool" else replace(m, ratio=pool, _undo=[]) for m in methods]


def run_generation_job(job: Job, settings: Settings, pipe: Any) -> list[dict[str, Any]]:
    original = pipe.unet
    compiled = _compiled(original, job.mode, settings)
    methods = _with_pool_default(build_methods(job.methods, [0.4]))
    generator = torch.Generator(settings.device)

    def enter(m: Method) -> None:  # methods go on the UNet itself; the call runs the compiled one
        pipe.unet = original
        m.apply(pipe)
        pipe.unet = compiled

    def leave(m: Method) -> None:
        pipe.unet = original
        m.remove(pipe)

    def call() -> Any:
        return pipe("a photograph of a corgi", height=job.size, width=job.size, num_inference_steps=settings.steps,
                    guidance_scale=7.5, generator=generator.manual_seed(0), output_type="np").images

    try:
        with torch.inference_mode():
            return _measure(methods, enter, leave, call, settings, 1)
    finally:
        pipe.unet = original


def run_tune_job(job: Job, settings: Settings) -> list[dict[str, Any]]:
    """``agentsd.tune`` on the denoiser at the job's size, one image per prompt with guidance
    (batch ``job.batch``), no cache: its table and its choice."""
    import agentsd

    unet = build_unet(job.arch, settings, job.dtype)
    result = agentsd.tune(unet, job.size, job.size, num_images=job.batch // 2, repeats=settings.repeats, cache=False,
                          progress=False)
    return [dict(result.to_dict(), markdown=result.to_markdown())]


def run_sync_job(job: Job, settings: Settings) -> list[dict[str, Any]]:
    """Each method on the SD1.5 UNet at 512 px (``--smoke``: the tiny one): a warm-up call (the
    first call of a run copies the schedule to the host once), then a call in sync-error mode."""
    unet = build_unet("sd15", settings)
    (sample, text), kwargs = unet_inputs(unet, Job("step", size=64 if settings.smoke else 512), settings)
    timesteps = schedule(settings)
    cuda = torch.device(settings.device).type == "cuda"
    rows = []
    with torch.inference_mode():
        for m in build_methods(job.methods, [0.4]):
            row = dict(method=m.name, phase=m.phase, key=m.key)
            m.apply(unet)
            try:
                unet(sample, timesteps[0], text, **kwargs)
                _sync(settings)
                if cuda:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    unet(sample, timesteps[1], text, **kwargs)
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode(0)
                row["host_syncs"] = "none" if cuda else "not checked (no CUDA device)"
            except RuntimeError as err:
                row["host_syncs"] = " ".join(str(err).split())[:300]
            finally:
                m.remove(unet)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- tables and the run


def job_table(job: Job, rows: list[dict[str, Any]]) -> str:
    if job.kind == "tune":
        return rows[0]["markdown"]
    if job.kind == "sync":
        lines = ["| method | host synchronisations in a UNet call |", "|---|---|"]
        return "\n".join(lines + [f"| {r['key']} | {r['host_syncs']} |" for r in rows])
    unit = "s/image" if job.kind == "generation" else "ms/step"
    scale = 1 if job.kind == "generation" else 1000
    lines = [f"| method | ratio | {unit} | speed-up vs {'sd'} | share of possible saving | peak memory MB | "
             "first calls s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['key']} | {fmt(r['ratio'], 'g')} | failed: {r['error']} | | | | |")
            continue
        share = None if r.get("saving_share") is None else 100 * r["saving_share"]
        lines.append(f"| {r['key']} | {fmt(r['ratio'], 'g')} | {r['median_s'] * scale:.{3 if scale == 1 else 2}f} | "
                     f"{fmt(r.get('speedup'), '.2f', 'x')} | {fmt(share, '.0f', ' %')} | {fmt(r.get('peak_mb'), '.0f')} | "
                     f"{fmt(r.get('first_calls_s'), '.1f')} |")
    return "\n".join(lines)


def describe(job: Job, settings: Settings) -> str:
    if job.kind == "sync":
        return "Host synchronisations of one UNet call (hook included), SD1.5 UNet, torch.cuda.set_sync_debug_mode."
    if job.kind == "tune":
        model = MODELS[job.arch][3] if job.arch in MODELS else job.arch.upper() + " UNet"
        return (f"What agentsd.tune picks: {model}, {job.size} px, batch {job.batch} (one image with guidance), "
                f"{job.dtype or settings.dtype}, eager, phases weighted by 50 PNDM steps.")
    what = {"step": f"one denoiser step, {MODELS[job.arch][3] if job.arch in MODELS else job.arch.upper() + ' UNet'}, "
                    f"batch {job.batch}",
            "generation": f"whole generations, {settings.steps} steps, guidance 7.5 (UNet batch 2), VAE included"}
    mode = {"eager": "eager", "regional": "compile_repeated_blocks(fullgraph=True)",
            "cudagraphs": "torch.compile(unet, mode='reduce-overhead')" if settings.backend == "inductor"
            else f"torch.compile(unet, backend={settings.backend!r})"}
    timing = (f"median of {settings.repeats} interleaved samples of {settings.inner} calls" if job.kind == "step"
              else f"median of {settings.repeats} interleaved generations")
    return (f"{job.size} px, {what[job.kind]}, {mode[job.mode]}, {job.dtype or settings.dtype}; {timing}. AgentSD rows run the "
            "agent phase on every step (whole generations: the default two phases); agentsd at ratio 0.4, agentsd-pool "
            "at its default 0.75 (keys/values pooled 2x2); todo on every step (whole generations: off after 80 %).")


def run(out: Path, settings: Settings, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every job of :func:`plan` not done yet in ``out``, within the time budget."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update(machine=machine(settings), settings=asdict(settings), skipped={})
    pipe = None
    for job in plan(settings.smoke):
        path = out / f"{job.name}.json"
        if path.exists() and json.loads(path.read_text()).get("done"):
            continue
        spent = time.perf_counter() - start
        if spent > settings.budget_s:
            summary["skipped"][job.name] = f"time budget of {settings.budget_s:.0f} s spent"
            continue
        progress(f"{job.name} (after {spent:.0f} s)")
        try:
            if job.kind == "step":
                rows = run_step_job(job, settings)
            elif job.kind == "generation":
                pipe = pipe or build_pipeline(settings)
                rows = run_generation_job(job, settings, pipe)
            elif job.kind == "tune":
                rows = run_tune_job(job, settings)
            else:
                rows = run_sync_job(job, settings)
        except Exception as err:  # noqa: BLE001 - a job that cannot run is named, the others go on
            summary["skipped"][job.name] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            (out / f"{job.name}.error.txt").write_text(traceback.format_exc())
            continue
        finally:
            torch._dynamo.reset()
            if torch.device(settings.device).type == "cuda":
                torch.cuda.empty_cache()
        table = f"{describe(job, settings)}\n\n{job_table(job, rows)}\n"
        path.write_text(json.dumps(dict(job=asdict(job), describe=describe(job, settings), rows=rows, done=True), indent=1))
        (out / f"{job.name}.md").write_text(table)
        summary.setdefault("done", [])
        if job.name not in summary["done"]:
            summary["done"].append(job.name)
        _write_summary(out, summary)
    _write_summary(out, summary)
    return summary


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    info = ", ".join(f"{k} {v}" for k, v in summary["machine"].items())
    parts = [f"# GPU tables\n\n{info}\n"]
    for name in summary.get("done", []):
        parts.append(f"## {name}\n\n{(out / f'{name}.md').read_text()}")
    if summary["skipped"]:
        parts.append("## Skipped\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary["skipped"].items()) + "\n")
    (out / "summary.md").write_text("\n".join(parts))

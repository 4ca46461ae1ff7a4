#!/usr/bin/env python
"""FID, prompt adherence, seconds per image and peak memory of SD vs tomesd vs AgentSD across
merge ratios, side by side on one pipeline with the same prompts and per-image seeds.

Protocols:
  quick  (default) the embedded reference model, a few minutes on a CPU: ratio 0.4, 64 images.
  full   the embedded model, 500 images per row, ratios 0.1-0.5, 50 steps (the README's table).
  paper  ToMeSD/AgentSD: 2 images per ImageNet-1k class, "A high quality photograph of a {cls}.",
         512 px, 50 PNDM steps, guidance 7.5; needs --model (an SD 1.x/2.x pipeline) and
         --reference-dir (real ImageNet images).

With the quick and full protocols, prompts are captions of the embedded model's procedural
generator and the real images for FID come from the same generator (or --reference-dir).

Outputs in --out: results.json, results.md (table), fid_vs_time.png, fidelity_vs_time.png (PSNR and
SSIM against the sd image of the same seed), samples.png, every image under images/, state.json
(setup, metrics) and timings/process-<rank>.json. Rerunning the same command resumes where it
stopped.

Several processes share the work when launched with accelerate: batch i goes to process i % N,
each process times its own batches, and the main process computes the metrics once all are done.

Examples:
  python scripts/benchmark_fid.py
  python scripts/benchmark_fid.py --protocol full --out runs/fid_full
  python scripts/benchmark_fid.py --protocol paper --model runwayml/stable-diffusion-v1-5 \\
      --reference-dir /data/imagenet/val --device cuda
  accelerate launch --num_processes 8 scripts/benchmark_fid.py --protocol paper \\
      --model runwayml/stable-diffusion-v1-5 --reference-dir /data/imagenet/val
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _lib in ("TRANSFORMERS", "DIFFUSERS"):  # library chatter would bury the results and errors
    os.environ.setdefault(f"{_lib}_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)
if TYPE_CHECKING:
    import torch
    from accelerate import PartialState

PRESETS = {
    "quick": dict(num_images=64, ratios=[0.4], steps=25, guidance=3.0, batch_size=32, size=64),
    "full": dict(num_images=500, ratios=[0.1, 0.2, 0.3, 0.4, 0.5], steps=50, guidance=3.0, batch_size=50, size=64),
    "paper": dict(num_images=2000, ratios=[0.1, 0.2, 0.3, 0.4, 0.5], steps=50, guidance=7.5, batch_size=8, size=512),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=list(PRESETS), default="quick", help="preset (default: quick)")
    p.add_argument("--model", default=None,
                   help="hub id or local folder of an SD 1.x/2.x pipeline (default: the embedded reference model)")
    p.add_argument("--reference-dir", type=Path, default=None,
                   help="folder of real images for FID (required by --protocol paper)")
    p.add_argument("--methods", nargs="+", default=["sd", "tomesd", "agentsd"],
                   help="sd tomesd agentsd deepcache tomesd+deepcache agentsd+deepcache "
                        "(default: sd tomesd agentsd)")
    p.add_argument("--deepcache-interval", type=int, default=3,
                   help="DeepCache: a full UNet every N steps (default: 3, DeepCache's value for SD1.5)")
    p.add_argument("--deepcache-branch", type=int, default=0,
                   help="DeepCache cache_branch_id (default: 0, DeepCache's value for SD1.5)")
    p.add_argument("--ratios", type=float, nargs="+", default=None, help="merge ratios in [0, 1) (default: preset)")
    p.add_argument("--num-images", type=int, default=None, help="images per row (default: preset)")
    p.add_argument("--num-real", type=int, default=None,
                   help="real images for FID (default: --num-images; all of --reference-dir)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: preset)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: preset)")
    p.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default: preset)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default: preset)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    p.add_argument("--no-bound", action="store_true", help="skip timing the bound (patched attention free)")
    p.add_argument("--bound-batches", type=int, default=2,
                   help="batches on which the bound is timed (default: 2; 0: all)")
    p.add_argument("--grid-columns", type=int, default=8, help="samples per row in samples.png (default: 8)")
    p.add_argument("--device", default=None,
                   help="cuda, cpu, cuda:1, ... (default: cuda if available, else cpu); under accelerate launch, "
                        "cuda is each process's own GPU")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/fid_<protocol>)")
    p.add_argument("--fresh", action="store_true", help="discard an earlier run in --out")
    p.add_argument("--skip-metrics", action="store_true",
                   help="stop after generation (on a machine without the FID network); "
                        "the same command without it later computes the metrics and generates nothing")
    p.add_argument("--clip-model", default=None, metavar="PATH_OR_ID",
                   help="also score every row against its prompts with torchmetrics' CLIPScore and this CLIP "
                        "(a local folder of CLIPModel + CLIPProcessor, or a hub id, which may download); "
                        "default: no CLIP score")
    p.add_argument("--compile", action="store_true",
                   help="run every method with its transformer blocks compiled (compile_repeated_blocks, "
                        "fullgraph=True, else with graph breaks, else eager; each reported); compilation "
                        "happens in untimed warm-up calls and is reported apart")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of --compile (default: inductor; aot_eager traces alike "
                        "without generating code, for quick checks)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("num_images", "steps", "batch_size", "grid_columns"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.deepcache_interval < 1 or args.deepcache_branch < 0:
        p.error("--deepcache-interval must be >= 1 and --deepcache-branch >= 0")
    if args.bound_batches < 0:
        p.error(f"--bound-batches must be >= 0, got {args.bound_batches}")
    if args.num_real is not None and args.num_real < 2:
        p.error(f"--num-real must be >= 2, got {args.num_real}")
    if args.size < 8 or args.size % 8:
        p.error(f"--size must be a positive multiple of 8, got {args.size}")
    if args.device is not None:
        import torch

        try:
            torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device!r} is not a device (cuda, cpu, cuda:1, ...)")
    if args.compile_backend != "inductor" and not args.compile:
        p.error("--compile-backend needs --compile")
    if args.protocol == "paper" and (args.model is None or args.reference_dir is None):
        p.error("--protocol paper needs --model (an SD 1.x/2.x pipeline) and --reference-dir (real images)")
    args.out = args.out or Path("runs") / f"fid_{args.protocol}"
    return args


def fail(message: str) -> NoReturn:
    """Stop with one line. Every process of a multi-process run meets the same errors, so only
    the main process prints it; the others stop with status 1."""
    from accelerate import PartialState

    sys.exit(f"benchmark_fid.py: error: {message}" if PartialState().is_main_process else 1)


def load_pipeline(model: str, device: "torch.device | str", dtype: "torch.dtype"):
    """The pipeline at ``model``; any failure becomes one line."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except Exception as e:  # noqa: BLE001 - the loader raises many kinds; the user needs one line
        fail(f"cannot load --model {model!r} as a Stable Diffusion 1.x/2.x pipeline: "
             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    if not isinstance(pipe.unet, UNet2DConditionModel):
        fail(f"--model {model!r} has no UNet2DConditionModel; supported: Stable Diffusion 1.x/2.x pipelines")
    return pipe.to(device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from accelerate import PartialState

    requested = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # one process unless launched by accelerate; waiting long for the slowest shard is no error
    process = PartialState(cpu=requested.type == "cpu", timeout=timedelta(days=7))
    try:
        run(args, process, requested)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args: argparse.Namespace, process: "PartialState", requested: "torch.device") -> None:
    """This process's part of the benchmark (all of it in a one-process run): its shard of the
    generation and, in the main process, the metrics and reports once every shard is done."""
    import torch
    from diffusers import PNDMScheduler

    from eval import fid_benchmark as fb
    from eval import fidelity, report
    from eval.adherence import reference_model_dir

    try:
        deepcache = dict(cache_interval=args.deepcache_interval, cache_branch_id=args.deepcache_branch)
        variants = fb.build_variants(args.methods, args.ratios, bound=not args.no_bound, deepcache=deepcache)
    except ValueError as e:
        fail(str(e))
    if args.compile and args.compile_backend not in (backends := torch._dynamo.list_backends(exclude_tags=())):
        fail(f"--compile-backend {args.compile_backend!r} is unknown; choose from {', '.join(backends)}")
    # each process its own GPU (accelerate's device) unless a device index was given
    device = process.device if requested.index is None and process.device.type == requested.type else requested
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]

    if args.protocol == "paper":
        protocol = fb.paper_protocol(args.num_images, args.size, args.steps, args.guidance, args.seed)
    else:
        protocol = fb.shapes_protocol(args.num_images, args.steps, args.guidance, args.seed, args.size, args.protocol)
    files = None
    if args.reference_dir is not None:
        try:  # fail early on a bad folder, not after hours of generation
            files = fb.reference_files(args.reference_dir, args.num_real)
        except (OSError, ValueError) as e:
            fail(str(e))
    num_real = len(files) if files else args.num_real or args.num_images

    def real_images():
        if files:
            return fb.load_reference_images(files)
        return fb.shapes_real_images(num_real, args.seed, args.size)

    model = args.model or str(reference_model_dir())
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():  # before any file is written
        fail(f"--model {model}: no such folder (give a local pipeline folder or a hub id)")

    def pipeline():
        pipe = load_pipeline(model, device, dtype)
        if args.protocol == "paper":
            pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
        return pipe

    if args.clip_model is not None and not args.skip_metrics and process.is_main_process:
        try:  # fail early, not after hours of generation
            fidelity.check_clip_model(args.clip_model)
        except ValueError as e:
            fail(str(e))
    if args.fresh and args.out.exists() and process.is_main_process:
        shutil.rmtree(args.out)
    process.wait_for_everyone()
    args.out.mkdir(parents=True, exist_ok=True)
    setup = dict(
        model=args.model or "embedded reference model", protocol=protocol.describe(),
        batch_size=args.batch_size, dtype=dtype_name, device=device.type, seed=args.seed,
        reference=str(args.reference_dir) if args.reference_dir else "procedural generator", num_real=num_real,
        compile=args.compile_backend if args.compile else None,
    )
    if any(v.uses_deepcache for v in variants):
        setup["deepcache"] = deepcache
    try:
        state = fb.generate_all(pipeline, variants, protocol, args.out, args.batch_size, setup,
                                bound_batches=args.bound_batches or None, progress=not args.no_progress,
                                process=process, compile_backend=setup["compile"])
    except ValueError as e:
        fail(str(e))
    if not process.is_main_process:  # every shard is done; the main process computes the metrics
        return
    if args.skip_metrics:
        print(f"images and timings in {args.out}/; rerun without --skip-metrics for the metrics")
        return
    metrics_device = device if device.type == "cpu" or torch.cuda.is_available() else "cpu"
    try:
        rows = fb.compute_metrics(variants, protocol, args.out, real_images, metrics_device,
                                  progress=not args.no_progress, clip_model=args.clip_model)
    except ValueError as e:
        fail(str(e))
    setup = {**setup, **state.data["generated_with"]}
    report.write_results(rows, setup, args.out)
    procs = setup["num_processes"]
    title = (f"{setup['model']}, {protocol.name}: {len(protocol.prompts)} images, {protocol.num_inference_steps} "
             f"steps, {dtype_name}, {setup['machine']}, {procs} process{'es' if procs > 1 else ''}")
    report.plot_fid_vs_time(rows, args.out / "fid_vs_time.png", title=title)
    report.plot_fidelity_vs_time(rows, args.out / "fidelity_vs_time.png", title=title)
    store = fb.ImageStore(args.out / "images")
    n = min(args.grid_columns, len(protocol.prompts))
    report.sample_grid({v.key: store.load(v.key, n) for v in variants if v.keeps_images}, args.out / "samples.png")
    print(report.describe(setup) + "\n\n" + report.markdown_table(rows, setup["num_processes"]))
    print(f"\nwritten to {args.out}/: results.json results.md fid_vs_time.png fidelity_vs_time.png samples.png "
          "images/ timings/")


if __name__ == "__main__":
    main()

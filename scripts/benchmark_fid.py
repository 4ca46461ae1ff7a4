#!/usr/bin/env python
"""FID, prompt adherence, same-seed fidelity, seconds per image and peak memory of SD against
tomesd, ToDo, AgentSD, T-GATE, CA-ToMe (and DeepCache) across merge ratios, side by side on one
pipeline with the same prompts and per-image seeds; a peer that does not run here is a row with its
reason. Every method, option and output: docs/benchmarks.md.

Protocols:
  quick  (default) the embedded reference model, a few minutes on a CPU: ratio 0.4, 64 images.
  full   the embedded model, 500 images per row, ratios 0.1-0.5, 50 steps.
  paper  ToMeSD/AgentSD: 2 images per ImageNet-1k class, "A high quality photograph of a {cls}.",
         512 px, 50 PNDM steps, guidance 7.5; needs --model (an SD 1.x/2.x pipeline) and
         --reference-dir (real ImageNet images).

Outputs in --out: results.json, results.md, fid_vs_time.png, fidelity_vs_time.png, samples.png,
images/, state.json and timings/process-<rank>.json. Rerunning the same command resumes. Under
`accelerate launch` the processes share the batches (batch i on process i % N).

Examples:
  python scripts/benchmark_fid.py
  python scripts/benchmark_fid.py --methods sd tomesd todo agentsd agentsd-pool --out runs/fid_new
  python scripts/benchmark_fid.py --methods sd tgate ca-tome deepcache tgate+deepcache --out runs/fid_peers
  python scripts/benchmark_fid.py --protocol full --out runs/fid_full
  accelerate launch --num_processes 8 scripts/benchmark_fid.py --protocol paper \\
      --model stable-diffusion-v1-5/stable-diffusion-v1-5 --reference-dir /data/imagenet/val
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _lib in ("TRANSFORMERS", "DIFFUSERS"):  # library chatter would bury the results and errors
    os.environ.setdefault(f"{_lib}_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

from eval import cli  # noqa: E402
from eval.protocols import PRESETS  # noqa: E402

#: the image side each embedded reference model was trained at
REFERENCE_SIZES = {"unet": 64, "dit": 128}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.Parser(__doc__)
    p.add_argument("--protocol", choices=list(PRESETS), default="quick", help="preset (default: quick)")
    p.add_argument("--model", default=None,
                   help="an embedded reference model by name (unet: the default; dit: the PixArt-layout transformer), "
                        "or a hub id or local folder of an SD 1.x/2.x or PixArt pipeline")
    p.add_argument("--reference-dir", type=Path, default=None,
                   help="folder of real images for FID (required by --protocol paper)")
    cli.add_method_arguments(p, ["sd", "tomesd", "agentsd"], ["schedule"], off_after=True, whole_calls=True)
    p.add_argument("--ratios", type=float, nargs="+", default=None, help="merge ratios in [0, 1) (default: preset)")
    p.add_argument("--num-images", type=int, default=None, help="images per row (default: preset)")
    p.add_argument("--num-real", type=int, default=None,
                   help="real images for FID (default: --num-images; all of --reference-dir)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: preset)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: preset)")
    p.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default: preset)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in px (default: preset; a reference model's own size, 64 or 128 px)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    p.add_argument("--no-bound", action="store_true", help="skip timing the bounds (patched attention free)")
    p.add_argument("--bound-batches", type=int, default=2,
                   help="batches on which the bounds are timed (default: 2; 0: all)")
    p.add_argument("--grid-columns", type=int, default=8, help="samples per row in samples.png (default: 8)")
    cli.add_device_arguments(p, None, "cuda if available, else cpu; under accelerate launch, each process's own GPU")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/fid_<protocol>)")
    p.add_argument("--fresh", action="store_true", help="discard an earlier run in --out")
    p.add_argument("--skip-metrics", action="store_true",
                   help="stop after generation; the same command without it later computes the metrics only")
    p.add_argument("--clip-model", default=None, metavar="PATH_OR_ID",
                   help="also report torchmetrics' CLIPScore with this CLIP (a local folder of CLIPModel + "
                        "CLIPProcessor, or a hub id, which may download); default: no CLIP score")
    p.add_argument("--compile", action="store_true",
                   help="compile every method's transformer blocks (compile_repeated_blocks, fullgraph=True, else "
                        "with graph breaks, else eager; each reported), in untimed warm-up calls")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of --compile (default: inductor; aot_eager traces without codegen)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.size is None and args.protocol != "paper" and args.model in REFERENCE_SIZES:
        args.size = REFERENCE_SIZES[args.model]
    for key, value in PRESETS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("num_images", "steps", "batch_size", "grid_columns"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.bound_batches < 0:
        p.error(f"--bound-batches must be >= 0, got {args.bound_batches}")
    if args.num_real is not None and args.num_real < 2:
        p.error(f"--num-real must be >= 2, got {args.num_real}")
    if args.size < 8 or args.size % 8:
        p.error(f"--size must be a positive multiple of 8, got {args.size}")
    cli.check_device(p, args.device)
    if args.compile_backend != "inductor" and not args.compile:
        p.error("--compile-backend needs --compile")
    if args.protocol == "paper" and (args.model is None or args.reference_dir is None):
        p.error("--protocol paper needs --model (an SD 1.x/2.x pipeline) and --reference-dir (real images)")
    args.options = cli.method_options(p, args)
    args.out = args.out or Path("runs") / f"fid_{args.protocol}"
    return args


def fail(message: str) -> NoReturn:
    """Stop with one line. Every process meets the same errors, so only the main one prints it."""
    from accelerate import PartialState

    sys.exit(f"benchmark_fid.py: error: {message}" if PartialState().is_main_process else 1)


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


def run(args: argparse.Namespace, process: Any, requested: Any) -> None:
    """This process's shard of the generation and, in the main process, the metrics and reports."""
    import torch
    from diffusers import PNDMScheduler

    from eval import fidelity, generation, plots, protocols, report
    from eval.reference import MODELS
    from eval.methods import build_methods, table_order
    from eval.metrics import compute_metrics
    from eval.runtime import DTYPES, dtype_name
    from eval.store import ImageStore, process_timings

    try:
        methods = table_order(build_methods(args.methods, args.ratios, args.options), bounds=not args.no_bound)
    except ValueError as e:
        fail(str(e))
    if args.compile and args.compile_backend not in (backends := torch._dynamo.list_backends(exclude_tags=())):
        fail(f"--compile-backend {args.compile_backend!r} is unknown; choose from {', '.join(backends)}")
    # each process its own GPU (accelerate's device) unless a device index was given
    device = process.device if requested.index is None and process.device.type == requested.type else requested
    dtype = dtype_name(args.dtype, device)
    protocol = protocols.make_protocol(args.protocol, args.num_images, args.size, args.steps, args.guidance, args.seed)
    try:  # fail early on a bad folder, not after hours of generation
        files = protocols.reference_files(args.reference_dir, args.num_real) if args.reference_dir else None
    except (OSError, ValueError) as e:
        fail(str(e))
    num_real = len(files) if files else args.num_real or args.num_images
    model = args.model or "unet"
    if model in REFERENCE_SIZES and not (MODELS[model] / "model_index.json").is_file():
        fail(f"--model {model}: the reference model is not in {MODELS[model]} (train it with "
             "scripts/train_reference_model.py)")
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():  # before any file is written
        fail(f"--model {model}: no such folder (give a local pipeline folder or a hub id)")

    def pipeline() -> Any:
        pipe = generation.load_pipeline(model, device, DTYPES[dtype])
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
        model=f"embedded reference model {model}" if model in REFERENCE_SIZES else model, protocol=protocol.describe(), batch_size=args.batch_size,
        dtype=dtype, device=device.type, seed=args.seed, num_real=num_real,
        reference=str(args.reference_dir) if args.reference_dir else "procedural generator",
        compile=args.compile_backend if args.compile else None, methods={m.key: m.settings() for m in methods},
    )
    try:
        state = generation.generate_all(pipeline, methods, protocol, args.out, args.batch_size, setup,
                                        bound_batches=args.bound_batches or None, progress=not args.no_progress,
                                        process=process, compile_backend=setup["compile"])
    except ValueError as e:
        fail(str(e))
    if not process.is_main_process:  # every shard is done; the main process computes the metrics
        return
    if args.skip_metrics:
        print(f"images and timings in {args.out}/; rerun without --skip-metrics for the metrics")
        return
    failed = report.failures(process_timings(args.out))  # rows with their reason, nothing to measure
    measured = [m for m in methods if m.key not in failed]
    metrics_device = device if device.type == "cpu" or torch.cuda.is_available() else "cpu"
    real = (lambda: protocols.load_reference_images(files)) if files else (
        lambda: protocols.shapes_real_images(num_real, args.seed, args.size))
    try:
        state = compute_metrics(measured, protocol, args.out, real, metrics_device, progress=not args.no_progress,
                                clip_model=args.clip_model)
    except ValueError as e:
        fail(str(e))
    rows = report.fid_rows(state, process_timings(args.out), methods, len(protocol.prompts),
                           protocol.scores_adherence, args.clip_model)
    setup = {**setup, **state.data["generated_with"]}
    text = report.write_fid_results(rows, setup, args.out)
    procs = setup["num_processes"]
    title = (f"{setup['model']}, {protocol.name}: {len(protocol.prompts)} images, {protocol.num_inference_steps} "
             f"steps, {dtype}, {setup['machine']}, {procs} process{'es' if procs > 1 else ''}")
    plots.plot_fid_vs_time(rows, args.out / "fid_vs_time.png", title=title)
    plots.plot_fidelity_vs_time(rows, args.out / "fidelity_vs_time.png", title=title)
    store, n = ImageStore(args.out / "images"), min(args.grid_columns, len(protocol.prompts))
    plots.sample_grid({m.key: store.load(m.key, n) for m in measured if m.keeps_images}, args.out / "samples.png")
    print(text + f"\nwritten to {args.out}/: results.json results.md fid_vs_time.png fidelity_vs_time.png "
          "samples.png images/ timings/")


if __name__ == "__main__":
    main()

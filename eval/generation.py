"""Generation of the FID harness: every method's images, batch by batch, sharded over processes,
resumable, timed, optionally compiled.

Every method draws the same prompts with the same per-image seeds. Generation runs batch by batch,
interleaved across the methods, so that drifts of a noisy machine hit all of them alike. Every
image is written to ``OUT/images/<method key>/<index>.png`` as soon as its batch is done, and the
wall time of each batch to the timings file of its process, ``OUT/timings/process-<rank>.json``;
a rerun skips what is on disk and loses nothing. Peak memory comes from a separate, untimed
warm-up batch (short schedule), so that its sampling does not slow the timed batches.

Several processes (``accelerate launch``) share the work by whole batches: batch ``i`` goes to
process ``i % N``, so every batch holds the same images as in a one-process run, and each process
interleaves its batches across the methods. A bound keeps no images and may be timed on the
first batches only. With a compile backend every method runs with the UNet's transformer blocks
compiled (``fullgraph=True``, else with graph breaks, else eager, each reported); compilation
happens in untimed warm-up calls at every batch size, reported apart.

A method that wraps the whole pipeline call (T-GATE's ``pipe.tgate``) is called in place of
``pipe``, with the same arguments. A method that does not run here (a peer that does not import, or
fails on this torch or diffusers) is no crash: the first line of its error is kept in the timings
file of its process (``error``), the other methods go on, and a rerun tries it again.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch._dynamo.utils import counters

from eval import runtime
from eval.methods import Method
from eval.peers import failure
from eval.protocols import Protocol
from eval.reference import MODELS, generation_kwargs
from eval.store import ImageStore, State, Timings, process_timings, timings_path

#: How a method runs under compilation, in the order they are tried.
COMPILE_MODES = ("fullgraph", "graph breaks", "eager")


def load_pipeline(model: str, device: torch.device | str, dtype: torch.dtype) -> Any:
    """The text-to-image pipeline at ``model`` (a reference model's name, a folder or a hub id) on
    ``device``: a Stable Diffusion 1.x/2.x pipeline, or a PixArt one.

    Raises:
        ValueError: one line, if it does not load or its denoiser is not one the harness runs.
    """
    from diffusers import DiffusionPipeline, PixArtTransformer2DModel, UNet2DConditionModel

    folder = MODELS.get(model, model)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001 - the loader raises many kinds; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load --model {model!r}: {first}") from None
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel) and \
            not isinstance(getattr(pipe, "transformer", None), PixArtTransformer2DModel):
        raise ValueError(f"--model {model!r} is a {type(pipe).__name__}; the harness runs Stable Diffusion 1.x/2.x "
                         "and PixArt text-to-image pipelines")
    return pipe.to(device)


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser (its UNet or transformer)."""
    return getattr(pipe, "unet", None) or pipe.transformer


def generate(pipe: Any, protocol: Protocol, start: int, stop: int, steps: int | None = None,
             call: Callable[..., Any] | None = None) -> np.ndarray:
    """Images ``start:stop`` of ``protocol`` as uint8 ``(n, H, W, 3)``, by ``call`` (default:
    ``pipe``; a method's wrapper of the whole call, :meth:`Method.call`)."""
    device = denoiser(pipe).device
    generators = [torch.Generator(device).manual_seed(s) for s in protocol.seeds[start:stop]]
    # tomesd forks its dst generator from the global RNG on its first call after apply_patch:
    # seeding it here makes the batch's images depend on the batch only, not on what ran before
    torch.manual_seed(protocol.seeds[start])
    out = (call or pipe)(
        prompt=list(protocol.prompts[start:stop]), height=protocol.height, width=protocol.width,
        num_inference_steps=steps or protocol.num_inference_steps, guidance_scale=protocol.guidance_scale,
        generator=generators, output_type="np", **generation_kwargs(pipe),
    )
    return (np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8)


def _synchronize(pipe: Any) -> None:
    if denoiser(pipe).device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """Switches methods on and off a pipeline, with their transformer blocks compiled by
    ``backend`` (None: eager) in the method's compile mode."""

    def __init__(self, pipe: Any, protocol: Protocol, backend: str | Any | None) -> None:
        self.pipe, self.protocol, self.backend = pipe, protocol, backend
        self.modes: dict[str, str] = {}

    @contextlib.contextmanager
    def running(self, m: Method) -> Iterator[None]:
        mode = self.modes.get(m.key, COMPILE_MODES[0])
        if self.backend is not None and mode != "eager":
            runtime.compile_blocks(denoiser(self.pipe), fullgraph=mode == "fullgraph", backend=self.backend)
        m.apply(self.pipe)
        try:  # a method that does not compile runs the compiled blocks eagerly
            with torch.compiler.set_stance("force_eager") if mode == "eager" else contextlib.nullcontext():
                yield
        finally:
            m.remove(self.pipe)

    def generate(self, m: Method, start: int, stop: int, steps: int | None = None) -> np.ndarray:
        with self.running(m):
            return generate(self.pipe, self.protocol, start, stop, steps, m.call(self.pipe))

    def compile(self, m: Method, batches: list[tuple[int, int]], steps: int) -> dict[str, Any]:
        """Compile ``m`` by generating each of ``batches`` (one per batch size) with ``steps``
        steps, in the first mode of :data:`COMPILE_MODES` that works. Returns the report: mode,
        seconds, graph breaks, and why the modes before failed."""
        report: dict[str, Any] = {"errors": {}}
        start = time.perf_counter()
        for mode in COMPILE_MODES:
            self.modes[m.key] = mode
            breaks = sum(counters["graph_break"].values())
            try:
                for b in batches:
                    self.generate(m, *b, steps=steps)
                break
            except Exception as err:  # noqa: BLE001 - whatever stops this mode, try the next
                if mode == "eager":
                    raise
                report["errors"][mode] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        _synchronize(self.pipe)
        report.update(mode=mode, seconds=time.perf_counter() - start,
                      graph_breaks=sum(counters["graph_break"].values()) - breaks, compiled_while_timed=0)
        return report


def generate_all(load: Callable[[], Any], methods: list[Method], protocol: Protocol, out: Path, batch_size: int,
                 setup: dict[str, Any], bound_batches: int | None = None, progress: bool = True,
                 process: Any = None, compile_backend: str | Any | None = None) -> State:
    """Generate every image of every method that is not on disk yet (see the module docstring).

    ``process`` is the ``accelerate.PartialState`` of a multi-process run (None: one process);
    every process calls this function, generates the batches ``i`` with ``i % N`` equal to its
    index, and returns once every process is done. ``load`` is called only when something is
    left to generate, so a finished run computes its metrics on a machine that cannot load the
    model. The machine, torch version, scheduler and number of processes of the generation are
    recorded in ``state.json`` ("generated_with"), and so is ``setup``: resuming with other ones
    raises ValueError instead of mixing timings. Bounds are timed on the first ``bound_batches``
    batches only (all when None).
    """
    rank, size = (process.process_index, process.num_processes) if process is not None else (0, 1)
    store, state = ImageStore(out / "images"), State(out / "state.json")
    state.check_setup(setup)  # every process reads the same file, so all of them agree; saved below
    timed = {m.key: set() for m in methods}
    for record in process_timings(out):  # read before any process writes (the gather below waits)
        for key, entry in record.data.items():
            timed.setdefault(key, set()).update(entry["batch_seconds"])
    n = len(protocol.prompts)
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]

    def done(m: Method, start: int, stop: int) -> bool:
        return f"{start}:{stop}" in timed[m.key] and (not m.keeps_images or store.has(m.key, range(start, stop)))

    todo = [(i, b, m) for i, b in enumerate(batches) for m in methods
            if not done(m, *b) and (m.keeps_images or bound_batches is None or i < bound_batches)]
    record = Timings(timings_path(out, rank))
    missing = {m.key: reason for m in {m.key: m for _, _, m in todo}.values() if (reason := m.unavailable())}
    for key, reason in missing.items():  # a row with its reason, before any model is loaded
        record.variant(key)["error"] = reason
    if missing:
        record.save()
        todo = [t for t in todo if t[2].key not in missing]
    if not todo:
        return state
    pipe = load()  # every process loads and checks, even one whose shard is done, so that all stop alike
    generated_with = dict(machine=runtime.machine_name(denoiser(pipe).device), torch=torch.__version__,
                          scheduler=type(pipe.scheduler).__name__, num_processes=size)
    seen = _gather(process, generated_with)
    recorded = state.data.get("generated_with", seen[0])
    other = next((g for g in seen if g != recorded), None)
    if other is not None:
        raise ValueError(f"{out} was generated with {recorded}, not {other}: its timings would mix; "
                         "use another --out or --fresh")
    state.data["generated_with"] = recorded
    if rank == 0:
        state.save()
    mine = [(b, m) for i, b, m in todo if i % size == rank]
    if mine:
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # one static graph per batch size
            _generate_shard(pipe, methods, protocol, mine, store, record, compile_backend, progress and rank == 0,
                            f"generate (process {rank} of {size})")
    if size > 1:
        process.wait_for_everyone()
    return state


def _gather(process: Any, obj: Any) -> list[Any]:
    """``obj`` of every process, in process order (on every process)."""
    if process is None or process.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _generate_shard(pipe: Any, methods: list[Method], protocol: Protocol, todo: list[tuple[tuple[int, int], Method]],
                    store: ImageStore, record: Timings, compile_backend: str | Any | None, progress: bool,
                    desc: str) -> None:
    """One process's batches: warm-up (and compilation), then the timed batches in order. A method
    that raises is left with its error (:func:`eval.peers.failure`) and without its other batches."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    runner = Runner(pipe, protocol, compile_backend)
    warm_steps = min(protocol.num_inference_steps, 4)  # both AgentSD phases, kernel selection
    generate(pipe, protocol, *todo[0][0], steps=warm_steps)  # one-time allocations, charged to none
    for m in methods:
        own = [b for b, tm in todo if tm is m]
        if not own:
            continue
        entry = record.variant(m.key)
        try:
            if compile_backend is not None:  # every batch size once, so that no timed batch compiles
                entry["compile"] = runner.compile(
                    m, list({stop - start: (start, stop) for start, stop in own}.values()), warm_steps)
            with runner.running(m), runtime.PeakMemory(denoiser(pipe).device) as mem:  # a size it was compiled for
                generate(pipe, protocol, *own[0], steps=warm_steps, call=m.call(pipe))
        except Exception as err:  # noqa: BLE001 - a method that does not run here is a row with its reason
            entry["error"] = failure(err)
            continue
        entry.pop("error", None)
        entry.setdefault("peak_memory_mb", mem.peak_mb)
    record.save()
    bar = tqdm(total=len(todo), desc=desc, unit="batch", disable=not progress)
    for (start, stop), m in todo:
        bar.set_postfix_str(f"{m.key} images {start}-{stop - 1}")
        bar.update(1)
        if "error" in record.variant(m.key):
            continue
        graphs = counters["stats"]["unique_graphs"]
        try:
            with runner.running(m):
                call = m.call(pipe)
                _synchronize(pipe)
                t0 = time.perf_counter()
                images = generate(pipe, protocol, start, stop, call=call)
                _synchronize(pipe)
                seconds = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - as in the warm-up: the row keeps its reason
            record.variant(m.key)["error"] = failure(err)
            record.save()
            continue
        if m.keeps_images:
            store.save(m.key, start, images)
        entry = record.variant(m.key)
        entry["batch_seconds"][f"{start}:{stop}"] = seconds
        entry["generated"] = entry.get("generated", 0) + 1
        if compile_backend is not None:  # a self-check: compilation must not be timed
            entry["compile"]["compiled_while_timed"] += counters["stats"]["unique_graphs"] - graphs
        record.save()
    bar.close()

"""Image quality and speed of SD, tomesd and AgentSD, side by side on one pipeline.

Every variant (a method at a merge ratio) draws the same prompts with the same per-image seeds.
Generation runs batch by batch, interleaved across the variants, so that drifts of a noisy
machine hit all of them alike. Every image is written to ``OUT/images/<variant>/<index>.png`` as
soon as its batch is done, and the wall time of each batch to the timings file of its process,
``OUT/timings/process-<rank>.json``; a rerun skips what is on disk and loses nothing. Seconds per
image are the summed batch times of all processes divided by the number of images. Peak memory
comes from a separate, untimed warm-up batch (short schedule), so that its sampling does not slow
the timed batches.

Several processes (``accelerate launch``) share the work by whole batches: batch ``i`` goes to
process ``i % N``, so every batch holds the same images as in a one-process run, and each process
interleaves its batches across the variants. Setup and metrics live in ``OUT/state.json``, which
only the main process writes; the metrics are computed once every shard is done.

A ``bound`` variant times the pipeline whose patched self-attention layers return zeros: the time
left if the patched attention cost nothing. It keeps no images and has no FID, and may be timed
on the first batches only.

With a compile backend, every variant runs with the UNet's transformer blocks compiled
(``compile_repeated_blocks``, ``fullgraph=True``, else with graph breaks, else eager, each
reported); compilation happens in untimed warm-up calls at every batch size, reported apart.
"""
from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch._dynamo.utils import counters

import agentsd
from eval.latency import PeakMemory, _compile_blocks, build_methods, saving_share

METHODS = ("sd", "tomesd", "agentsd", "deepcache", "tomesd+deepcache", "agentsd+deepcache")
#: DeepCache's recommended settings for SD1.5 (its README): a full UNet every 3rd step, branch 0.
DEEPCACHE = dict(cache_interval=3, cache_branch_id=0)
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_DATA = Path(__file__).resolve().parent / "data"


# ----------------------------------------------------------------------------- what is compared


@dataclass
class Variant:
    """A method at a merge ratio (``None`` for methods without one), switchable on a pipeline.

    AgentSD is applied to the pipeline, so its phases follow the pipeline's steps; tomesd and the
    bound act on the UNet as in the latency benchmark (:func:`eval.latency.build_methods`).
    ``+deepcache`` methods (and ``deepcache`` alone) add DeepCache (PyPI ``deepcache``,
    ``DeepCacheSDHelper``) with ``deepcache`` settings on top; ``bound+deepcache`` is their bound.
    """

    method: str
    ratio: float | None = None
    deepcache: dict[str, int] | None = None
    _unet_method: Any = field(default=None, repr=False, compare=False)
    _helper: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.base in ("tomesd", "bound"):
            self._unet_method = build_methods([self.base], [self.ratio])[0]

    @property
    def base(self) -> str:
        """The method without DeepCache (``sd`` for ``deepcache``)."""
        return "sd" if self.method == "deepcache" else self.method.removesuffix("+deepcache")

    @property
    def uses_deepcache(self) -> bool:
        return self.method != self.base

    @property
    def key(self) -> str:
        return self.method if self.ratio is None else f"{self.method}@{self.ratio:g}"

    @property
    def keeps_images(self) -> bool:
        return self.base != "bound"

    def apply(self, pipe: Any) -> None:
        if self.base == "agentsd":
            agentsd.apply_patch(pipe, ratio=self.ratio)
        elif self._unet_method is not None:
            self._unet_method.apply(pipe.unet)
        if self.uses_deepcache:
            from DeepCache import DeepCacheSDHelper

            self._helper = DeepCacheSDHelper(pipe=pipe)
            self._helper.set_params(**{**DEEPCACHE, **(self.deepcache or {})})
            self._helper.enable()

    def remove(self, pipe: Any) -> None:
        if self._helper is not None:
            self._helper.disable()
            self._helper = None
        if self.base == "agentsd":
            agentsd.remove_patch(pipe)
        elif self._unet_method is not None:
            self._unet_method.remove(pipe.unet)


def build_variants(methods: Iterable[str], ratios: Iterable[float], bound: bool = True,
                   deepcache: dict[str, int] | None = None) -> list[Variant]:
    """``sd`` and ``deepcache`` once, the other methods once per ratio, and the bounds if asked:
    ``bound`` and, when a DeepCache method is compared, ``bound+deepcache``. ``deepcache`` holds
    the DeepCache ``cache_interval`` and ``cache_branch_id`` (default: :data:`DEEPCACHE`).

    Raises:
        ValueError: for an unknown method or a ratio outside [0, 1).
    """
    methods, ratios = list(methods), list(ratios)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    bad = [r for r in ratios if not 0 <= r < 1]
    if bad:
        raise ValueError(f"ratios must be in [0, 1), got {', '.join(f'{r:g}' for r in bad)}")
    if not methods:
        raise ValueError("no method to compare")
    if any(m not in ("sd", "deepcache") for m in methods) and not ratios:
        raise ValueError("tomesd and agentsd need at least one ratio")
    variants = [Variant(m, None if m in ("sd", "deepcache") else r, deepcache) for m in METHODS if m in methods
                for r in ([None] if m in ("sd", "deepcache") else ratios)]
    if bound:
        variants.append(Variant("bound"))
        if any(v.uses_deepcache for v in variants):
            variants.append(Variant("bound+deepcache", None, deepcache))
    return variants


@dataclass(frozen=True)
class Protocol:
    """What to generate: prompts with their seeds and the sampling settings."""

    name: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    scores_adherence: bool  # the prompts are eval.shapes captions

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_images"] = len(d.pop("prompts"))
        d.pop("seeds")
        return d


def shapes_protocol(num_images: int, steps: int, guidance: float, seed: int = 0, size: int = 64,
                    name: str = "shapes") -> Protocol:
    """Captions of the embedded model's generator (its training distribution) as prompts."""
    from eval import shapes

    captions = shapes.make_dataset(num_images, seed=10_000 + seed, size=8).captions
    return Protocol(name, tuple(captions), tuple(seed + i for i in range(num_images)), size, size, steps,
                    guidance, True)


def shapes_real_images(num_images: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """Real images for :func:`shapes_protocol`: the generator's images for the same captions
    (the first ``n`` match the first ``n`` prompts), uint8 ``(num_images, size, size, 3)``."""
    from eval import shapes

    return shapes.make_dataset(num_images, seed=10_000 + seed, size=size).images


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (first WordNet lemma of each synset)."""
    return (_DATA / "imagenet_classes.txt").read_text().splitlines()


def paper_protocol(num_images: int = 2000, size: int = 512, steps: int = 50, guidance: float = 7.5,
                   seed: int = 0) -> Protocol:
    """The ToMeSD/AgentSD protocol: "A high quality photograph of a {cls}." for the ImageNet-1k
    classes, 512 px, 50 PNDM steps, guidance 7.5. Image ``i`` shows class ``i % 1000``, so 2000
    images are 2 per class and fewer still cover the classes evenly."""
    classes = imagenet_classes()
    prompts = [f"A high quality photograph of a {classes[i % len(classes)]}." for i in range(num_images)]
    return Protocol("paper", tuple(prompts), tuple(seed + i for i in range(num_images)), size, size, steps,
                    guidance, False)


def reference_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    """The image files of ``folder`` (recursively, sorted), at most ``limit``, each checked to open.

    Raises:
        FileNotFoundError: if the folder does not exist.
        ValueError: if it holds no images, or an image cannot be read (named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--reference-dir {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"--reference-dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for path in files:
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise ValueError(f"cannot read reference image {path}: {e}") from None
    return files


def load_reference_images(files: list[Path], size: int = 299) -> np.ndarray:
    """Centre-cropped squares of ``files`` resized to ``size`` px, uint8 ``(n, size, size, 3)``."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as im:
            im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        out[i] = np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))
    return out


# ----------------------------------------------------------------------------- generation


class ImageStore:
    """Generated images on disk: ``root/<variant key>/<index:05d>.png``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str, index: int) -> Path:
        return self.root / key / f"{index:05d}.png"

    def has(self, key: str, indices: Iterable[int]) -> bool:
        return all(self.path(key, i).exists() for i in indices)

    def save(self, key: str, start: int, images: np.ndarray) -> None:
        (self.root / key).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            tmp = self.path(key, start + i).with_suffix(".tmp.png")
            Image.fromarray(image).save(tmp)
            tmp.replace(self.path(key, start + i))  # never a half-written image

    def load(self, key: str, n: int) -> np.ndarray:
        return np.stack([np.asarray(Image.open(self.path(key, i)).convert("RGB")) for i in range(n)])


class JsonRecord:
    """A JSON file held in memory; ``save`` replaces it atomically (never half-written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


class State(JsonRecord):
    """``state.json``, written by the main process only: the run's setup, the machine it was
    generated on (``generated_with``) and the computed metrics of every variant."""

    def variant(self, key: str) -> dict[str, Any]:
        return self.data.setdefault("variants", {}).setdefault(key, {})

    def check_setup(self, setup: dict[str, Any]) -> None:
        """Record the run's settings, or refuse to mix with a run made with other settings.

        Raises:
            ValueError: if the folder holds a run with different settings.
        """
        old = self.data.setdefault("setup", setup)
        if old != setup:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {setup.get(k)!r}" for k in sorted(setup.keys() | old.keys())
                             if old.get(k) != setup.get(k))
            raise ValueError(f"{self.path.parent} holds a run with other settings ({diff}); "
                             "use another --out or --fresh")


class Timings(JsonRecord):
    """The timings of one process, ``OUT/timings/process-<rank>.json`` (no other process writes
    it): per variant the wall time of each of its batches (``"start:stop"``), the peak memory of
    its warm-up batch and, when compiled, its compile report."""

    def variant(self, key: str) -> dict[str, Any]:
        return self.data.setdefault(key, {"batch_seconds": {}})


def timings_path(out: Path, rank: int) -> Path:
    """The timings file of process ``rank`` of the run in ``out``."""
    return out / "timings" / f"process-{rank}.json"


def process_timings(out: Path) -> list[Timings]:
    """The timings of every process of the run in ``out``, in process order."""
    paths = sorted((out / "timings").glob("process-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [Timings(p) for p in paths]


def _generate(pipe: Any, protocol: Protocol, start: int, stop: int, steps: int | None = None) -> np.ndarray:
    device = pipe.unet.device
    generators = [torch.Generator(device).manual_seed(s) for s in protocol.seeds[start:stop]]
    # tomesd forks its dst generator from the global RNG on its first call after apply_patch:
    # seeding it here makes the batch's images depend on the batch only, not on what ran before
    torch.manual_seed(protocol.seeds[start])
    out = pipe(
        prompt=list(protocol.prompts[start:stop]), height=protocol.height, width=protocol.width,
        num_inference_steps=steps or protocol.num_inference_steps, guidance_scale=protocol.guidance_scale,
        generator=generators, output_type="np",
    )
    return (np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8)


def _synchronize(pipe: Any) -> None:
    if pipe.unet.device.type == "cuda":
        torch.cuda.synchronize()


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU and its thread count: where the timings were taken."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


#: How a variant runs under compilation, in the order they are tried.
COMPILE_MODES = ("fullgraph", "graph breaks", "eager")


class _Runner:
    """Switches variants on and off a pipeline, with their transformer blocks compiled by
    ``backend`` (None: eager) in the variant's compile mode."""

    def __init__(self, pipe: Any, protocol: Protocol, backend: str | None) -> None:
        self.pipe, self.protocol, self.backend = pipe, protocol, backend
        self.modes: dict[str, str] = {}

    @contextlib.contextmanager
    def running(self, v: Variant) -> Iterator[None]:
        mode = self.modes.get(v.key, COMPILE_MODES[0])
        if self.backend is not None and mode != "eager":
            _compile_blocks(self.pipe.unet, fullgraph=mode == "fullgraph", backend=self.backend)
        v.apply(self.pipe)
        try:  # a variant that does not compile runs the compiled blocks eagerly
            with torch.compiler.set_stance("force_eager") if mode == "eager" else contextlib.nullcontext():
                yield
        finally:
            v.remove(self.pipe)

    def generate(self, v: Variant, start: int, stop: int, steps: int | None = None) -> np.ndarray:
        with self.running(v):
            return _generate(self.pipe, self.protocol, start, stop, steps)

    def compile(self, v: Variant, batches: list[tuple[int, int]], steps: int) -> dict[str, Any]:
        """Compile ``v`` by generating each of ``batches`` (one per batch size) with ``steps``
        steps: in the first mode of :data:`COMPILE_MODES` that works. Returns the report: mode,
        seconds, graph breaks, and why the modes before failed."""
        report: dict[str, Any] = {"errors": {}}
        start = time.perf_counter()
        for mode in COMPILE_MODES:
            self.modes[v.key] = mode
            breaks = sum(counters["graph_break"].values())
            try:
                for b in batches:
                    self.generate(v, *b, steps=steps)
                break
            except Exception as err:  # noqa: BLE001 - whatever stops this mode, try the next
                if mode == "eager":
                    raise
                report["errors"][mode] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        _synchronize(self.pipe)
        report.update(mode=mode, seconds=time.perf_counter() - start,
                      graph_breaks=sum(counters["graph_break"].values()) - breaks, compiled_while_timed=0)
        return report


def generate_all(
    load_pipeline: Callable[[], Any],
    variants: list[Variant],
    protocol: Protocol,
    out: Path,
    batch_size: int,
    setup: dict[str, Any],
    bound_batches: int | None = None,
    progress: bool = True,
    process: Any = None,
    compile_backend: str | None = None,
) -> State:
    """Generate every image of every variant that is not on disk yet (see the module docstring).

    ``process`` is the ``accelerate.PartialState`` of a multi-process run (None: one process);
    every process calls this function, generates the batches ``i`` with ``i % N`` equal to its
    index, and returns once every process is done.

    ``load_pipeline`` is called only when something is left to generate, so a finished run
    computes its metrics on a machine that cannot load (or run) the model. The machine, torch
    version, scheduler and number of processes of the generation are recorded in ``state.json``
    ("generated_with"); resuming with other ones raises ValueError instead of mixing timings.

    The ``bound`` is timed on the first ``bound_batches`` batches only (all when ``None``): it
    keeps no images, so more batches only refine its time.

    ``setup`` (model, protocol, batch size, compilation, ...) is recorded in ``state.json``; a
    folder holding a run with another setup raises ValueError instead of mixing the two.

    ``compile_backend`` (e.g. ``"inductor"``) compiles every variant's transformer blocks (see
    :class:`_Runner`); the compiling calls are untimed and reported in the timings.
    """
    rank, size = (process.process_index, process.num_processes) if process is not None else (0, 1)
    store, state = ImageStore(out / "images"), State(out / "state.json")
    state.check_setup(setup)  # every process reads the same file, so all of them agree; saved below
    timed = {v.key: set() for v in variants}
    for record in process_timings(out):  # read before any process writes (the gather below waits)
        for key, entry in record.data.items():
            timed.setdefault(key, set()).update(entry["batch_seconds"])
    n = len(protocol.prompts)
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]

    def done(v: Variant, start: int, stop: int) -> bool:
        return f"{start}:{stop}" in timed[v.key] and (not v.keeps_images or store.has(v.key, range(start, stop)))

    todo = [(i, b, v) for i, b in enumerate(batches) for v in variants
            if not done(v, *b) and (v.keeps_images or bound_batches is None or i < bound_batches)]
    if not todo:
        return state
    # every process loads and checks, even one whose shard is done, so that all stop alike
    pipe = load_pipeline()
    generated_with = dict(machine=machine_name(pipe.unet.device), torch=torch.__version__,
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
    mine = [(b, v) for i, b, v in todo if i % size == rank]
    if mine:
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # one static graph per batch size
            _generate_shard(pipe, variants, protocol, mine, store, Timings(timings_path(out, rank)),
                            compile_backend, progress and rank == 0, f"generate (process {rank} of {size})")
    if size > 1:
        process.wait_for_everyone()
    return state


def _gather(process: Any, obj: Any) -> list[Any]:
    """``obj`` of every process, in process order (on every process)."""
    if process is None or process.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _generate_shard(
    pipe: Any,
    variants: list[Variant],
    protocol: Protocol,
    todo: list[tuple[tuple[int, int], Variant]],
    store: ImageStore,
    record: Timings,
    compile_backend: str | None,
    progress: bool,
    desc: str,
) -> None:
    """One process's batches: warm-up (and compilation), then the timed batches in order."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    runner = _Runner(pipe, protocol, compile_backend)
    warm_steps = min(protocol.num_inference_steps, 4)  # both AgentSD phases, kernel selection
    _generate(pipe, protocol, *todo[0][0], steps=warm_steps)  # one-time allocations, charged to none
    for v in variants:
        own = [b for b, tv in todo if tv is v]
        if not own:
            continue
        entry = record.variant(v.key)
        if compile_backend is not None:  # every batch size once, so that no timed batch compiles
            entry["compile"] = runner.compile(v, list({stop - start: (start, stop) for start, stop in own}.values()),
                                              warm_steps)
        with runner.running(v), PeakMemory(pipe.unet.device) as mem:  # a batch size it was compiled for
            _generate(pipe, protocol, *own[0], steps=warm_steps)
        entry.setdefault("peak_memory_mb", mem.peak_mb)
    record.save()
    bar = tqdm(total=len(todo), desc=desc, unit="batch", disable=not progress)
    for (start, stop), v in todo:
        bar.set_postfix_str(f"{v.key} images {start}-{stop - 1}")
        graphs = counters["stats"]["unique_graphs"]
        with runner.running(v):
            _synchronize(pipe)
            t0 = time.perf_counter()
            images = _generate(pipe, protocol, start, stop)
            _synchronize(pipe)
            seconds = time.perf_counter() - t0
        if v.keeps_images:
            store.save(v.key, start, images)
        entry = record.variant(v.key)
        entry["batch_seconds"][f"{start}:{stop}"] = seconds
        if compile_backend is not None:  # a self-check: compilation must not be timed
            entry["compile"]["compiled_while_timed"] += counters["stats"]["unique_graphs"] - graphs
        record.save()
        bar.update(1)
    bar.close()


# ----------------------------------------------------------------------------- metrics


def compute_metrics(
    variants: list[Variant],
    protocol: Protocol,
    out: Path,
    real_images: Callable[[], np.ndarray],
    device: str | torch.device = "cpu",
    batch_size: int = 50,
    progress: bool = True,
    clip_model: str | None = None,
) -> list[dict[str, Any]]:
    """The metrics of every variant that keeps images, each kept in ``state.json`` as soon as it
    is computed (a rerun computes only what is missing):

    - ``fid`` (and ``adherence``, when the protocol has it); ``real_images`` is called only if
      some FID is still missing;
    - ``psnr`` and ``ssim`` of every image against the ``sd`` image of the same index (when ``sd``
      is among the variants);
    - with ``clip_model`` (a local CLIP folder or hub id), ``clip_score`` against the prompts.

    Returns one row per variant (:func:`summarize`).
    """
    from tqdm.auto import tqdm

    from eval.fid import fid_metric
    from eval.fidelity import clip_score, float_batches, load_clip, same_seed_fidelity

    store, state = ImageStore(out / "images"), State(out / "state.json")
    n = len(protocol.prompts)
    sd = next((v for v in variants if v.method == "sd"), None)
    fid = clip = reference = None
    for v in tqdm([v for v in variants if v.keeps_images], desc="metrics", disable=not progress):
        entry = state.variant(v.key)
        images = None
        if "fid" not in entry:
            if fid is None:
                fid = fid_metric(device)
                for batch in float_batches(real_images(), batch_size, device):
                    fid.update(batch, real=True)
            images = store.load(v.key, n)
            fid.reset()  # keeps the real features
            for batch in float_batches(images, batch_size, device):
                fid.update(batch, real=False)
            entry["fid"] = float(fid.compute())
            if protocol.scores_adherence:
                from eval.adherence import score_adherence

                entry["adherence"] = score_adherence(images, list(protocol.prompts))
            state.save()
        if sd is not None and v is not sd and "psnr" not in entry:
            images = store.load(v.key, n) if images is None else images
            reference = store.load(sd.key, n) if reference is None else reference
            entry.update(same_seed_fidelity(images, reference, batch_size, device))
            state.save()
        if clip_model is not None and entry.get("clip_score", {}).get("model") != clip_model:
            images = store.load(v.key, n) if images is None else images
            clip = load_clip(clip_model, device) if clip is None else clip
            entry["clip_score"] = {"model": clip_model,
                                   "score": clip_score(clip, images, protocol.prompts, batch_size, device)}
            state.save()
    return summarize(state, process_timings(out), variants, protocol, clip_model)


def summarize(state: State, timings: list[Timings], variants: list[Variant], protocol: Protocol,
              clip_model: str | None = None) -> list[dict[str, Any]]:
    """One row per variant: its metrics (fid, adherence, psnr and ssim against ``sd``, and the
    CLIP score of ``clip_model`` when given), seconds per image (summed batch times of all
    processes / images: the device time an image costs), images per second (images / the
    longest summed time of one process: the run's wall-clock throughput), speed-up over ``sd``
    and share of the possible saving (``bound``), peak memory (the largest of the processes),
    the compile report when compiled, and the number of images."""
    n = len(protocol.prompts)
    rows = []
    for v in variants:
        entry = state.variant(v.key)
        records = [t.data[v.key] for t in timings if v.key in t.data]
        batch_seconds = {k: s for r in records for k, s in r["batch_seconds"].items()}
        images = sum(int(k.split(":")[1]) - int(k.split(":")[0]) for k in batch_seconds)
        longest = max((sum(r["batch_seconds"].values()) for r in records), default=0)
        memory = [r["peak_memory_mb"] for r in records if r.get("peak_memory_mb") is not None]
        row: dict[str, Any] = dict(
            method=v.method, ratio=v.ratio,
            fid=entry.get("fid"), psnr=entry.get("psnr"), ssim=entry.get("ssim"),
            seconds_per_image=sum(batch_seconds.values()) / images if images else None,
            images_per_second=images / longest if longest else None,
            peak_memory_mb=max(memory, default=None),
            num_images=n if v.keeps_images else 0,
        )
        if protocol.scores_adherence and v.keeps_images:
            row["adherence"] = entry.get("adherence", {}).get("all_correct")
        if clip_model is not None and v.keeps_images:
            row["clip_score"] = entry.get("clip_score", {}).get("score")
        compiled = [r["compile"] for r in records if "compile" in r]
        if compiled:
            row.update(
                compile_mode=COMPILE_MODES[max(COMPILE_MODES.index(c["mode"]) for c in compiled)],
                compile_seconds=max(c["seconds"] for c in compiled),
                graph_breaks=max(c["graph_breaks"] for c in compiled),
                compiled_while_timed=sum(c["compiled_while_timed"] for c in compiled),
                compile_errors={m: e for c in compiled for m, e in c["errors"].items()},
            )
        rows.append(row)
    def time_of(method: str) -> float | None:
        return next((r["seconds_per_image"] for r in rows if r["method"] == method), None)

    base = time_of("sd")
    for r in rows:  # DeepCache rows: the saving from DeepCache alone to DeepCache with free attention
        t = r["seconds_per_image"]
        cached = r["method"] == "deepcache" or r["method"].endswith("+deepcache")
        r["speedup"] = base / t if base and t else None
        r["saving_share"] = (saving_share(time_of("deepcache"), t, time_of("bound+deepcache")) if cached
                             else saving_share(base, t, time_of("bound")))
    return rows

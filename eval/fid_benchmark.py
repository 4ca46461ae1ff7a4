"""Image quality and speed of SD, tomesd and AgentSD, side by side on one pipeline.

Every variant (a method at a merge ratio) draws the same prompts with the same per-image seeds.
Generation runs batch by batch, interleaved across the variants, so that drifts of a noisy
machine hit all of them alike. Every image is written to ``OUT/images/<variant>/<index>.png`` as
soon as its batch is done, and the wall time of each batch to ``OUT/state.json``; a rerun skips
what is on disk and loses nothing. Seconds per image are the summed batch times divided by the
number of images. Peak memory comes from a separate, untimed warm-up batch (short schedule), so
that its sampling does not slow the timed batches.

A ``bound`` variant times the pipeline whose patched self-attention layers return zeros: the time
left if the patched attention cost nothing. It keeps no images and has no FID, and may be timed
on the first batches only.
"""
from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import agentsd
from eval.latency import PeakMemory, build_methods, saving_share

METHODS = ("sd", "tomesd", "agentsd")
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_DATA = Path(__file__).resolve().parent / "data"


# ----------------------------------------------------------------------------- what is compared


@dataclass
class Variant:
    """A method at a merge ratio (``None`` for methods without one), switchable on a pipeline.

    AgentSD is applied to the pipeline, so its phases follow the pipeline's steps; tomesd and the
    bound act on the UNet as in the latency benchmark (:func:`eval.latency.build_methods`).
    """

    method: str
    ratio: float | None = None
    _unet_method: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method in ("tomesd", "bound"):
            self._unet_method = build_methods([self.method], [self.ratio])[0]

    @property
    def key(self) -> str:
        return self.method if self.ratio is None else f"{self.method}@{self.ratio:g}"

    @property
    def keeps_images(self) -> bool:
        return self.method != "bound"

    def apply(self, pipe: Any) -> None:
        if self.method == "agentsd":
            agentsd.apply_patch(pipe, ratio=self.ratio)
        elif self._unet_method is not None:
            self._unet_method.apply(pipe.unet)

    def remove(self, pipe: Any) -> None:
        if self.method == "agentsd":
            agentsd.remove_patch(pipe)
        elif self._unet_method is not None:
            self._unet_method.remove(pipe.unet)


def build_variants(methods: Iterable[str], ratios: Iterable[float], bound: bool = True) -> list[Variant]:
    """``sd`` once, ``tomesd`` and ``agentsd`` once per ratio, and the ``bound`` if asked.

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
    if any(m != "sd" for m in methods) and not ratios:
        raise ValueError("tomesd and agentsd need at least one ratio")
    variants = [Variant(m, None if m == "sd" else r) for m in METHODS if m in methods
                for r in ([None] if m == "sd" else ratios)]
    return variants + [Variant("bound")] if bound else variants


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


class State:
    """``state.json``: batch wall times, peak memory and computed metrics of every variant."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def variant(self, key: str) -> dict[str, Any]:
        return self.data.setdefault("variants", {}).setdefault(key, {"batch_seconds": {}})

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

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def _generate(pipe: Any, protocol: Protocol, start: int, stop: int, steps: int | None = None) -> np.ndarray:
    device = pipe.unet.device
    generators = [torch.Generator(device).manual_seed(s) for s in protocol.seeds[start:stop]]
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


def generate_all(
    load_pipeline: Callable[[], Any],
    variants: list[Variant],
    protocol: Protocol,
    out: Path,
    batch_size: int,
    setup: dict[str, Any],
    bound_batches: int | None = None,
    progress: bool = True,
) -> State:
    """Generate every image of every variant that is not on disk yet (see the module docstring).

    ``load_pipeline`` is called only when something is left to generate, so a finished run
    computes its metrics on a machine that cannot load (or run) the model. The machine, torch
    version and scheduler of the generation are recorded in ``state.json`` ("generated_with");
    resuming on another machine raises ValueError instead of mixing timings.

    The ``bound`` is timed on the first ``bound_batches`` batches only (all when ``None``): it
    keeps no images, so more batches only refine its time.

    ``setup`` (model, protocol, batch size, ...) is recorded in ``state.json``; a folder holding a
    run with another setup raises ValueError instead of mixing the two.
    """
    from tqdm.auto import tqdm

    store, state = ImageStore(out / "images"), State(out / "state.json")
    state.check_setup(setup)
    n = len(protocol.prompts)
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]

    def done(v: Variant, start: int, stop: int) -> bool:
        timed = f"{start}:{stop}" in state.variant(v.key)["batch_seconds"]
        return timed and (not v.keeps_images or store.has(v.key, range(start, stop)))

    todo = [(b, v) for i, b in enumerate(batches) for v in variants
            if not done(v, *b) and (v.keeps_images or bound_batches is None or i < bound_batches)]
    if not todo:
        return state
    pipe = load_pipeline()
    generated_with = dict(machine=machine_name(pipe.unet.device), torch=torch.__version__,
                          scheduler=type(pipe.scheduler).__name__)
    old = state.data.setdefault("generated_with", generated_with)
    if old != generated_with:
        raise ValueError(f"{out} was generated with {old}, not {generated_with}: its timings would mix; "
                         "use another --out or --fresh")
    pipe.set_progress_bar_config(disable=True)
    warm_steps = min(protocol.num_inference_steps, 4)  # both AgentSD phases, kernel selection
    _generate(pipe, protocol, *batches[0], steps=warm_steps)  # one-time allocations, charged to none
    for v in variants:
        if any(tv is v for _, tv in todo):
            v.apply(pipe)
            with PeakMemory(pipe.unet.device) as mem:
                _generate(pipe, protocol, *batches[0], steps=warm_steps)
            v.remove(pipe)
            entry = state.variant(v.key)
            entry.setdefault("peak_memory_mb", mem.peak_mb)
    state.save()
    bar = tqdm(total=len(todo), desc="generate", unit="batch", disable=not progress)
    for (start, stop), v in todo:
        bar.set_postfix_str(f"{v.key} images {start}-{stop - 1}")
        v.apply(pipe)
        _synchronize(pipe)
        t0 = time.perf_counter()
        images = _generate(pipe, protocol, start, stop)
        _synchronize(pipe)
        seconds = time.perf_counter() - t0
        v.remove(pipe)
        if v.keeps_images:
            store.save(v.key, start, images)
        state.variant(v.key)["batch_seconds"][f"{start}:{stop}"] = seconds
        state.save()
        bar.update(1)
    bar.close()
    return state


# ----------------------------------------------------------------------------- metrics


def compute_metrics(
    variants: list[Variant],
    protocol: Protocol,
    out: Path,
    real_images: Callable[[], np.ndarray],
    device: str | torch.device = "cpu",
    batch_size: int = 50,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """FID (and adherence, when the protocol has it) of every variant, kept in ``state.json``;
    ``real_images`` is called only if some FID is still missing. Returns one row per variant."""
    from tqdm.auto import tqdm

    from eval.fid import fid_metric

    store, state = ImageStore(out / "images"), State(out / "state.json")
    n = len(protocol.prompts)
    metric = None
    for v in tqdm(variants, desc="metrics", disable=not progress):
        entry = state.variant(v.key)
        if not v.keeps_images or entry.get("num_images") == n:
            continue
        if metric is None:
            metric = fid_metric(device)
            for batch in _batches(real_images(), batch_size):
                metric.update(_to_float(batch, device), real=True)
        images = store.load(v.key, n)
        metric.reset()  # keeps the real features
        for batch in _batches(images, batch_size):
            metric.update(_to_float(batch, device), real=False)
        entry["fid"] = float(metric.compute())
        if protocol.scores_adherence:
            from eval.adherence import score_adherence

            entry["adherence"] = score_adherence(images, list(protocol.prompts))
        entry["num_images"] = n
        state.save()
    return summarize(state, variants, protocol)


def _batches(images: np.ndarray, size: int) -> Iterable[np.ndarray]:
    return (images[i : i + size] for i in range(0, len(images), size))


def _to_float(images: np.ndarray, device: str | torch.device) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(device)


def summarize(state: State, variants: list[Variant], protocol: Protocol) -> list[dict[str, Any]]:
    """One row per variant: fid, adherence, seconds per image, speed-up over ``sd`` and share of
    the possible saving (``bound``), peak memory, number of images."""
    n = len(protocol.prompts)
    rows = []
    for v in variants:
        entry = state.variant(v.key)
        seconds = list(entry["batch_seconds"].values())
        timed = sum(int(k.split(":")[1]) - int(k.split(":")[0]) for k in entry["batch_seconds"])
        row: dict[str, Any] = dict(
            method=v.method, ratio=v.ratio,
            fid=entry.get("fid"),
            seconds_per_image=sum(seconds) / timed if timed else None,
            peak_memory_mb=entry.get("peak_memory_mb"),
            num_images=n if v.keeps_images else 0,
        )
        if protocol.scores_adherence and v.keeps_images:
            row["adherence"] = entry.get("adherence", {}).get("all_correct")
        rows.append(row)
    base = next((r["seconds_per_image"] for r in rows if r["method"] == "sd"), None)
    floor = next((r["seconds_per_image"] for r in rows if r["method"] == "bound"), None)
    for r in rows:
        t = r["seconds_per_image"]
        r["speedup"] = base / t if base and t else None
        r["saving_share"] = saving_share(base, t, floor)
    return rows

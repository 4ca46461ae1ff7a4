"""DreamBooth finetuning of a Stable Diffusion pipeline with AgentSD on every step.

The UNet (all of it, or LoRA adapters on its attention projections) learns a subject from a few
instance images ("a photo of sks dog"), optionally with prior preservation: class images made by
the base model ("a photo of a dog") are cached on disk and their loss is added with a weight.
The text encoder and the VAE stay frozen. With ``agentsd=True`` (the default) the UNet is patched
with :func:`agentsd.apply_patch` and ``agent_fraction=1`` during training, so the model learns to
work with agent attention on every denoising step. The settings are stored with the result:

* full finetuning: ``StableDiffusionPipeline.from_pretrained(output_dir)``, then
  ``agentsd.apply_patch(pipe)`` with no arguments (the settings live in the UNet's
  ``config.json``, see :func:`agentsd.store_config`);
* LoRA: ``pipe.load_lora_weights(output_dir)`` on the base pipeline, then
  ``agentsd.apply_patch(pipe, config=agentsd.load_config(output_dir))``.

:func:`train_dreambooth` runs the whole job with accelerate (device placement, mixed precision,
gradient accumulation, data-parallel processes under ``accelerate launch``): checkpoints every
``checkpointing_steps`` and resumption at the same step with the same result, validation images on
disk every ``validation_steps``, a tqdm bar. All randomness of optimisation step ``k`` in process
``p`` comes from ``(seed, k, p)``, so a resumed run repeats the uninterrupted one.
``scripts/train_dreambooth.py`` is its command line.

Data-parallel training (``accelerate launch --num_processes N``): every process draws its own
``batch_size`` instance (and class) samples per micro-step, so a step sees ``N * batch_size``
instance samples (times ``gradient_accumulation_steps``); the gradients are averaged, so every process
holds the same weights. Process 0 draws what a one-process run draws. Missing class images are
split between the processes; checkpoints, validation images and the result are written once, by the
main process.

A checkpoint is what ``accelerator.save_state`` writes (the trainable UNet parameters as
safetensors, the optimizer, the LR schedule and the random states, all loaded with
``weights_only=True``), plus :data:`CHECKPOINT_FILE`: the step, the run settings and the size and
sha256 of every file. A checkpoint that was changed or damaged, or made with other settings or
another number of processes, raises ValueError naming the file before anything is loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config import AgentSDConfig, save_config
from .patch import apply_patch, store_config

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASS_MANIFEST = ".agentsd_class_images.json"  # hidden: not taken for an image
CHECKPOINTS = "checkpoints"
#: in every checkpoint folder: step, run settings, number of processes, size and sha256 of each file
CHECKPOINT_FILE = "dreambooth_checkpoint.json"
SETTINGS_FILE = "dreambooth.json"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: settings that define a run: a resumed run must have the same ones
RUN_FIELDS = (
    "instance_prompt", "class_prompt", "num_class_images", "prior_loss_weight", "resolution", "batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "seed", "lora_rank",
    "lora_alpha", "agentsd", "ratio",
)


# ----------------------------------------------------------------------------- input checks and data


def check_resolution(resolution: Any) -> int:
    """Return ``resolution`` if it is a positive multiple of 8, else raise ValueError/TypeError."""
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise TypeError(f"resolution must be an int, got {type(resolution).__name__}")
    if resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    return resolution


def list_images(folder: str | Path, what: str = "instance folder") -> list[Path]:
    """The image files of ``folder``, sorted by name (hidden files and sub-folders are ignored).

    Raises:
        FileNotFoundError: if ``folder`` does not exist.
        ValueError: if it is not a folder, holds no images, or holds files that are not images
            (by extension: :data:`IMAGE_EXTENSIONS`), which are named.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{what} {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        raise ValueError(
            f"{what} {folder} holds files that are not images: {', '.join(others)} "
            f"(accepted: {', '.join(IMAGE_EXTENSIONS)})"
        )
    if not files:
        raise ValueError(f"{what} {folder} holds no images")
    return files


def load_images(folder: str | Path, resolution: int, what: str = "instance folder") -> torch.Tensor:
    """Every image of ``folder`` as a float tensor ``(N, 3, resolution, resolution)`` in [-1, 1].

    Images are scaled so that the shorter side is ``resolution``, then centre-cropped.

    Raises:
        FileNotFoundError, ValueError: see :func:`list_images`; ValueError also for images that
        cannot be read, which are all named (none is skipped).
    """
    resolution = check_resolution(resolution)
    images, unreadable = [], []
    for path in list_images(folder, what):
        try:
            with Image.open(path) as img:
                img = ImageOps.fit(img.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
        except (OSError, SyntaxError, ValueError) as err:
            unreadable.append(f"{path.name} ({err})")
            continue
        images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3))
    if unreadable:
        raise ValueError(f"cannot read {len(unreadable)} image(s) in {what} {folder}: {'; '.join(unreadable)}")
    return torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _class_manifest(prompt: str, resolution: int) -> dict[str, Any]:
    return {"prompt": prompt, "resolution": resolution}


def missing_class_images(folder: str | Path, prompt: str, num_images: int, resolution: int) -> list[int]:
    """The indices ``i`` of the images ``class_{i}.png`` that the class image cache ``folder`` lacks.

    Images already there are counted (diffusers does the same, so a folder of your own class
    images works too): only as many indices as are needed to reach ``num_images`` are returned.
    The folder is only read.

    Raises:
        ValueError: if the cache was made for another prompt or resolution (hidden manifest).
    """
    folder = Path(folder)
    manifest = _class_manifest(prompt, resolution)
    manifest_path = folder / CLASS_MANIFEST
    if manifest_path.exists() and (old := json.loads(manifest_path.read_text())) != manifest:
        raise ValueError(f"class image folder {folder} was made for {old}, not {manifest}; use another folder")
    if not folder.is_dir():
        return list(range(num_images))
    have = sum(p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") for p in folder.iterdir())
    missing = [i for i in range(num_images) if not (folder / f"class_{i:05d}.png").exists()]
    return missing[: max(0, num_images - have)]


@torch.no_grad()
def generate_class_images(
    pipe: Any,
    folder: str | Path,
    prompt: str,
    num_images: int,
    resolution: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    progress: bool = True,
    indices: Sequence[int] | None = None,
) -> None:
    """Fill the prior-preservation cache ``folder`` up to ``num_images`` images of ``prompt``.

    Image ``class_{i}.png`` uses seed ``seed + i``, so the cache depends neither on interruptions
    nor on the number of processes that fill it. A hidden manifest records the prompt and
    resolution of generated images; a cache made for another prompt or resolution raises
    ValueError instead of being mixed (see :func:`missing_class_images`).

    Args:
        indices: the images to make; default: all of :func:`missing_class_images`. Data-parallel
            processes each pass their share of one listing made by all of them before any of them
            writes.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    if indices is None:
        indices = missing_class_images(folder, prompt, num_images, resolution)
    if not indices:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{CLASS_MANIFEST}.{os.getpid()}.tmp"  # processes that share the folder each replace it whole
    tmp.write_text(json.dumps(_class_manifest(prompt, resolution)) + "\n")
    os.replace(tmp, folder / CLASS_MANIFEST)
    for i in tqdm(indices, desc="class images", disable=not progress):
        image = pipe(
            prompt, height=resolution, width=resolution, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed + i),
        ).images[0]
        tmp = folder / f".class_{i:05d}.png"
        image.save(tmp, format="PNG")
        tmp.rename(folder / f"class_{i:05d}.png")


@torch.no_grad()
def encode_prompt(pipe: Any, prompt: str) -> torch.Tensor:
    """The frozen text encoder's embedding ``(1, tokens, dim)`` of ``prompt``."""
    ids = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


@torch.no_grad()
def encode_images(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the frozen VAE's latent distribution of ``images``, already scaled.

    A training latent is ``mean + std * noise``: the same as encoding every step, at no cost.
    """
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return dist.mean * scale, dist.std * scale


class Batch(NamedTuple):
    """One training batch: instance samples first, then class samples (prior preservation)."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    num_instance: int


def dreambooth_loss(
    unet: Any, scheduler: Any, batch: Batch, prior_loss_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The DreamBooth loss on ``batch``.

    Returns ``(loss, instance_loss, prior_loss)``: the MSE of the UNet's prediction against the
    target of the scheduler's ``prediction_type`` (epsilon or v), the prior part weighted by
    ``prior_loss_weight``; ``prior_loss`` is None without class samples.
    """
    latents, embeddings, noise, timesteps, n = batch
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, embeddings).sample.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
    target = target.float()
    instance = F.mse_loss(pred[:n], target[:n])
    if n == len(pred):
        return instance, instance, None
    prior = F.mse_loss(pred[n:], target[n:])
    return instance + prior_loss_weight * prior, instance, prior


# ----------------------------------------------------------------------------- settings


@dataclass
class DreamBoothSettings:
    """Everything :func:`train_dreambooth` needs; see ``scripts/train_dreambooth.py --help``.

    ``lora_rank=None`` finetunes the whole UNet; an int trains LoRA adapters of that rank on the
    UNet's attention projections. ``agentsd=False`` finetunes without AgentSD. Prior preservation
    is on when ``class_prompt`` is given (class images cached in ``class_dir``, default
    ``<output_dir>/class_images``).
    """

    pretrained: str
    instance_dir: str
    instance_prompt: str
    output_dir: str
    class_prompt: str | None = None
    class_dir: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    resolution: int = 512
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-6
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int = 400
    seed: int = 0
    mixed_precision: str = "no"
    lora_rank: int | None = None
    lora_alpha: float | None = None
    agentsd: bool = True
    ratio: float = 0.4
    checkpointing_steps: int = 100
    keep_checkpoints: int = 2
    validation_prompt: str | None = None
    validation_steps: int = 100
    num_validation_images: int = 2
    inference_steps: int = 25
    guidance_scale: float = 7.5
    progress: bool = True

    def __post_init__(self) -> None:
        check_resolution(self.resolution)
        for name in (
            "num_class_images", "batch_size", "gradient_accumulation_steps", "max_train_steps",
            "checkpointing_steps", "keep_checkpoints", "validation_steps", "num_validation_images",
            "inference_steps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise ValueError(f"lora_rank must be an int >= 1 or None, got {self.lora_rank!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if not self.instance_prompt.strip():
            raise ValueError("instance_prompt must not be empty")
        self.agentsd_config()  # validates ratio

    def agentsd_config(self) -> AgentSDConfig:
        """The AgentSD settings of training and of the result: agent attention on every step."""
        return AgentSDConfig(ratio=self.ratio, agent_fraction=1.0)

    def run_dict(self) -> dict[str, Any]:
        """The settings that define the run (compared when resuming)."""
        return {name: getattr(self, name) for name in RUN_FIELDS}


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """The checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = root.glob("step-*") if root.exists() else []
    return sorted(p for p in found if p.name[5:].isdigit() and (p / CHECKPOINT_FILE).exists())


def _trainable(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def unsafe_file_error(path: str | Path, err: BaseException) -> ValueError:
    """The one-line error for a file that ``torch.load(path, weights_only=True)`` refused with ``err``.

    It names the file and the reason, and leaves out torch's advice to load it with pickle anyway:
    the one thing not to do with a checkpoint of unknown origin.
    """
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"the Python object {found[1]}" if found else "more than tensors and plain values"
        reason = f"it holds {what}, which weights_only=True refuses"
    else:
        reason = _first_line(err)
    return ValueError(f"checkpoint file {path} cannot be loaded safely: {reason}")


def _checkpoint_hooks(accelerator: Any) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` keep only the trainable UNet parameters,
    under their names in the unwrapped UNet (LoRA checkpoints stay small; names do not depend on
    the data-parallel wrapper)."""
    from accelerate.utils import SAFE_WEIGHTS_NAME
    from safetensors import safe_open
    from safetensors.torch import load_file

    def save(models: list, weights: list, output_dir: str) -> None:
        (model,) = models
        weights.clear()
        if accelerator.is_main_process:  # the only one that writes them
            weights.append({k: v.detach().cpu() for k, v in _trainable(accelerator.unwrap_model(model)).items()})

    def load(models: list, input_dir: str) -> None:
        (model,) = models
        path = Path(input_dir) / SAFE_WEIGHTS_NAME
        params = _trainable(accelerator.unwrap_model(model))
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        wanted = {k: list(p.shape) for k, p in params.items()}
        if shapes != wanted:
            other = sorted(k for k in shapes.keys() | wanted.keys() if shapes.get(k) != wanted.get(k))
            raise ValueError(
                f"checkpoint file {path} does not hold the trainable weights of this UNet "
                f"({len(other)} names or shapes differ, e.g. {other[0]})"
            )
        state = load_file(str(path))
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])
        models.clear()  # loaded: accelerate loads the rest (optimizer, LR schedule, random states)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _save_checkpoint(accelerator: Any, folder: Path, step: int, run: dict[str, Any]) -> None:
    """``accelerator.save_state`` into a temporary folder, :data:`CHECKPOINT_FILE`, then a rename
    to ``folder``; called by every process (each writes its random states, the main one the rest)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        meta = {"step": step, "run": run, "files": files}
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    accelerator.wait_for_everyone()


def _verify_checkpoint(folder: Path, accelerator: Any, run: dict[str, Any]) -> int:
    """Check checkpoint ``folder`` before anything is loaded from it and return its step.

    Its :data:`CHECKPOINT_FILE` must be readable and made with the settings ``run``; every file it
    lists must have the recorded size and sha256, the files that ``accelerator.load_state`` reads
    must be among them, and each of them but the safetensors weights must load with
    ``weights_only=True``. Every process checks every file, so all of them fail alike.

    Raises:
        FileNotFoundError: if ``folder`` has no :data:`CHECKPOINT_FILE`.
        ValueError: naming the file, for anything else.
    """
    from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, SCALER_NAME, SCHEDULER_NAME, load

    meta_path = folder / CHECKPOINT_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no checkpoint {CHECKPOINT_FILE} in {folder}")
    try:
        meta = json.loads(meta_path.read_text())
        step, saved = int(meta["step"]), dict(meta["run"])
        files = {str(name): (int(v["bytes"]), str(v["sha256"])) for name, v in meta["files"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"checkpoint file {meta_path} cannot be read: {_first_line(err)}") from None
    changed = sorted(k for k in run if saved.get(k) != run[k])
    if changed:
        raise ValueError(
            f"checkpoint {folder} was made with other settings: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {run[k]!r})" for k in changed)
        )
    needed = [SAFE_WEIGHTS_NAME, f"{OPTIMIZER_NAME}.bin", f"{SCHEDULER_NAME}.bin"]
    needed += [SCALER_NAME] if accelerator.scaler is not None else []
    if missing := [name for name in needed if name not in files]:
        raise ValueError(f"checkpoint file {meta_path} lists no {', '.join(missing)}")
    for name, (size, sha256) in sorted(files.items()):
        path = folder / name
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"checkpoint file {meta_path} lists a file outside its folder: {name!r}")
        if not path.is_file():
            raise ValueError(f"checkpoint file {path} is missing")
        if path.stat().st_size != size or _sha256(path) != sha256:
            raise ValueError(f"checkpoint file {path} is damaged or was changed (its size or sha256 differs)")
        if name != SAFE_WEIGHTS_NAME:
            try:
                load(path, map_location="cpu", mmap=True)  # weights_only=True
            except Exception as err:  # noqa: BLE001 - any failure: the file is not what save_state writes
                raise unsafe_file_error(path, err) from None
    return step


# ----------------------------------------------------------------------------- training


def load_pipeline(pretrained: str) -> Any:
    """``StableDiffusionPipeline.from_pretrained(pretrained)`` with its progress bars off.

    Raises:
        FileNotFoundError: for a local path that does not exist.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise FileNotFoundError(f"pretrained model folder {pretrained} does not exist")
    pipe = StableDiffusionPipeline.from_pretrained(pretrained)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """The generator of all randomness of micro-step ``step`` in data-parallel process ``process``.

    It depends only on these three; process 0 draws what a one-process run draws.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + step + process * 0x9E37_79B9_7F4B) & 0x7FFF_FFFF_FFFF)


def sample_batch(
    data: dict[str, torch.Tensor], batch_size: int, num_train_timesteps: int, generator: torch.Generator
) -> Batch:
    """Draw ``batch_size`` instance samples (and as many class samples) with their noise and timesteps.

    ``data`` holds ``instance_mean``/``instance_std`` (and ``class_mean``/``class_std`` for prior
    preservation) and the prompt embeddings ``instance_embedding``/``class_embedding``.
    """
    parts = ["instance"] + (["class"] if "class_mean" in data else [])
    latents, embeddings = [], []
    for part in parts:
        mean, std = data[f"{part}_mean"], data[f"{part}_std"]
        idx = torch.randint(len(mean), (batch_size,), generator=generator)
        eps = torch.randn(mean[idx].shape, generator=generator)
        latents.append(mean[idx] + std[idx] * eps.to(mean.device))
        embeddings.append(data[f"{part}_embedding"].expand(batch_size, -1, -1))
    latents = torch.cat(latents)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.randint(num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
    return Batch(latents, torch.cat(embeddings), noise, timesteps, batch_size)


def _add_lora(unet: Any, settings: DreamBoothSettings) -> None:
    from peft import LoraConfig

    unet.requires_grad_(False)
    alpha = settings.lora_alpha if settings.lora_alpha is not None else settings.lora_rank
    config = LoraConfig(
        r=settings.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)
    )
    with torch.random.fork_rng(devices=[]):  # the same initial adapters in every run and process
        torch.manual_seed(settings.seed)
        unet.add_adapter(config)


@torch.no_grad()
def _validate(pipe: Any, settings: DreamBoothSettings, step: int) -> None:
    folder = Path(settings.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(settings.num_validation_images):
        image = pipe(
            settings.validation_prompt, height=settings.resolution, width=settings.resolution,
            num_inference_steps=settings.inference_steps, guidance_scale=settings.guidance_scale,
            generator=torch.Generator().manual_seed(settings.seed + i),
        ).images[0]
        image.save(folder / f"step-{step:06d}-{i}.png")


def _save_result(pipe: Any, unet: Any, settings: DreamBoothSettings) -> None:
    out = Path(settings.output_dir)
    if settings.lora_rank is None:
        if settings.agentsd:
            store_config(unet, settings.agentsd_config())
        pipe.save_pretrained(out)
    else:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        type(pipe).save_lora_weights(out, unet_lora_layers=layers)
        if settings.agentsd:
            save_config(settings.agentsd_config(), out)
    (out / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(settings), indent=2) + "\n")


def train_dreambooth(settings: DreamBoothSettings, resume: str | bool = False) -> Path:
    """Finetune ``settings.pretrained`` and save the result into ``settings.output_dir``.

    Under ``accelerate launch --num_processes N`` every process calls it with the same arguments
    and they train data-parallel (see the module docstring); it returns in every process once the
    result is written.

    Args:
        settings: what to train and how.
        resume: ``True`` continues from the latest checkpoint in ``output_dir`` (from scratch if
            there is none), a path continues from that checkpoint folder. Either must have been
            made with the same run settings and number of processes.

    Returns:
        ``output_dir``: a full pipeline (``save_pretrained``) or, with LoRA, the LoRA weights
        (``pytorch_lora_weights.safetensors``), plus ``agentsd_config`` storage (see the module
        docstring) and ``dreambooth.json`` (the settings).

    Raises:
        FileNotFoundError, ValueError: for bad input (folders, images, resolution, a checkpoint
        that is missing, damaged, changed or made with other settings), before any training and
        before anything is loaded from the checkpoint.
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    s = settings
    instance = load_images(s.instance_dir, s.resolution, "instance folder")
    accelerator = Accelerator(
        mixed_precision=s.mixed_precision, gradient_accumulation_steps=s.gradient_accumulation_steps
    )
    main, rank, processes = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    run = {**s.run_dict(), "num_processes": processes}
    resume_from: Path | None = None
    if isinstance(resume, (str, Path)):
        resume_from = Path(resume)
    elif resume:
        found = checkpoint_dirs(s.output_dir)
        resume_from = found[-1] if found else None
    step = _verify_checkpoint(resume_from, accelerator, run) if resume_from is not None else 0

    pipe = load_pipeline(s.pretrained)
    pipe.to(accelerator.device)
    for module in (pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    data = {"instance_embedding": encode_prompt(pipe, s.instance_prompt)}
    data["instance_mean"], data["instance_std"] = encode_images(pipe.vae, instance)
    if s.class_prompt:
        class_dir = Path(s.class_dir) if s.class_dir else Path(s.output_dir) / "class_images"
        missing = missing_class_images(class_dir, s.class_prompt, s.num_class_images, s.resolution)
        accelerator.wait_for_everyone()  # every process listed the folder before any writes to it
        generate_class_images(
            pipe, class_dir, s.class_prompt, s.num_class_images, s.resolution, s.inference_steps, s.guidance_scale,
            s.seed, s.progress and main, indices=missing[rank::processes],
        )
        accelerator.wait_for_everyone()
        data["class_embedding"] = encode_prompt(pipe, s.class_prompt)
        class_images = load_images(class_dir, s.resolution, "class folder")
        data["class_mean"], data["class_std"] = encode_images(pipe.vae, class_images)

    unet = pipe.unet
    if s.lora_rank is not None:
        _add_lora(unet, s)
    if s.agentsd:
        apply_patch(pipe, config=s.agentsd_config())
    unet.train()
    params = list(_trainable(unet).values())
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate)
    # the prepared schedule steps once per process at every optimisation step
    lr_scheduler = get_scheduler(
        s.lr_scheduler, optimizer, num_warmup_steps=s.lr_warmup_steps * processes,
        num_training_steps=s.max_train_steps * processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    _checkpoint_hooks(accelerator)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))

    bar = tqdm(total=s.max_train_steps, initial=step, desc="dreambooth", disable=not (s.progress and main))
    while step < s.max_train_steps:
        for micro in range(s.gradient_accumulation_steps):
            gen = step_generator(s.seed, step * s.gradient_accumulation_steps + micro, rank)
            batch = sample_batch(data, s.batch_size, noise_scheduler.config.num_train_timesteps, gen)
            with accelerator.accumulate(unet), accelerator.autocast():
                loss, _, _ = dreambooth_loss(unet, noise_scheduler, batch, s.prior_loss_weight)
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % s.checkpointing_steps == 0 or step == s.max_train_steps:
            _save_checkpoint(accelerator, Path(s.output_dir) / CHECKPOINTS / f"step-{step:06d}", step, run)
            if main:
                for old in checkpoint_dirs(s.output_dir)[: -s.keep_checkpoints]:
                    shutil.rmtree(old)
        if main and s.validation_prompt and (step % s.validation_steps == 0 or step == s.max_train_steps):
            unet.eval()
            _validate(pipe, s, step)
            unet.train()
    bar.close()
    if main:
        _save_result(pipe, accelerator.unwrap_model(unet), s)
    accelerator.wait_for_everyone()
    return Path(s.output_dir)

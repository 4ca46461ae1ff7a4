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
gradient accumulation; one process, one device): checkpoints every ``checkpointing_steps`` and
resumption at the same step with the same result, validation images on disk every
``validation_steps``, a tqdm bar. All
randomness of optimisation step ``k`` comes from ``(seed, k)``, so a resumed run repeats the
uninterrupted one. ``scripts/train_dreambooth.py`` is its command line.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
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
STATE_FILE = "state.pt"
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
) -> None:
    """Fill the prior-preservation cache ``folder`` up to ``num_images`` images of ``prompt``.

    Images already there are kept and counted (diffusers does the same, so a folder of your own
    class images works too); image ``class_{i}.png`` uses seed ``seed + i``, so the cache does not
    depend on interruptions. A hidden manifest records the prompt and resolution of generated
    images; a cache made for another prompt or resolution raises ValueError instead of being mixed.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"prompt": prompt, "resolution": resolution}
    manifest_path = folder / CLASS_MANIFEST
    if manifest_path.exists() and (old := json.loads(manifest_path.read_text())) != manifest:
        raise ValueError(f"class image folder {folder} was made for {old}, not {manifest}; use another folder")
    have = sum(p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") for p in folder.iterdir())
    missing = [i for i in range(num_images) if not (folder / f"class_{i:05d}.png").exists()][: num_images - have]
    if missing:
        manifest_path.write_text(json.dumps(manifest) + "\n")
    for i in tqdm(missing, desc="class images", disable=not progress):
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
    return sorted(p for p in found if p.name[5:].isdigit() and (p / STATE_FILE).exists())


def _trainable(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def _save_checkpoint(folder: Path, unet: Any, optimizer: Any, lr_scheduler: Any, step: int, run: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "step": step,
        "run": run,
        "trainable": {k: v.detach().cpu() for k, v in _trainable(unet).items()},
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
    }
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_checkpoint(folder: Path, unet: Any, optimizer: Any, lr_scheduler: Any, run: dict) -> int:
    if not (folder / STATE_FILE).exists():
        raise FileNotFoundError(f"no checkpoint {STATE_FILE} in {folder}")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    changed = sorted(k for k in run if state["run"].get(k) != run[k])
    if changed:
        raise ValueError(
            f"checkpoint {folder} was made with other settings: "
            + ", ".join(f"{k}={state['run'].get(k)!r} (now {run[k]!r})" for k in changed)
        )
    params = _trainable(unet)
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return int(state["step"])


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


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of all randomness of micro-step ``step`` (depends only on seed and step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF)


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

    Args:
        settings: what to train and how.
        resume: ``True`` continues from the latest checkpoint in ``output_dir`` (from scratch if
            there is none), a path continues from that checkpoint folder.

    Returns:
        ``output_dir``: a full pipeline (``save_pretrained``) or, with LoRA, the LoRA weights
        (``pytorch_lora_weights.safetensors``), plus ``agentsd_config`` storage (see the module
        docstring) and ``dreambooth.json`` (the settings).

    Raises:
        FileNotFoundError, ValueError: for bad input (folders, images, resolution, a checkpoint
        made with other settings), before any training.
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    s = settings
    instance = load_images(s.instance_dir, s.resolution, "instance folder")
    resume_from: Path | None = None
    if isinstance(resume, (str, Path)):
        resume_from = Path(resume)
        if not (resume_from / STATE_FILE).exists():
            raise FileNotFoundError(f"no checkpoint {STATE_FILE} in {resume_from}")
    elif resume:
        found = checkpoint_dirs(s.output_dir)
        resume_from = found[-1] if found else None

    accelerator = Accelerator(
        mixed_precision=s.mixed_precision, gradient_accumulation_steps=s.gradient_accumulation_steps
    )
    if accelerator.num_processes > 1:
        raise ValueError("train_dreambooth runs in one process (one device); launch it without multi-process")
    pipe = load_pipeline(s.pretrained)
    pipe.to(accelerator.device)
    for module in (pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    data = {"instance_embedding": encode_prompt(pipe, s.instance_prompt)}
    data["instance_mean"], data["instance_std"] = encode_images(pipe.vae, instance)
    if s.class_prompt:
        class_dir = Path(s.class_dir) if s.class_dir else Path(s.output_dir) / "class_images"
        generate_class_images(
            pipe, class_dir, s.class_prompt, s.num_class_images, s.resolution, s.inference_steps, s.guidance_scale,
            s.seed, s.progress,
        )
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
    lr_scheduler = get_scheduler(
        s.lr_scheduler, optimizer, num_warmup_steps=s.lr_warmup_steps, num_training_steps=s.max_train_steps
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    step = 0
    if resume_from is not None:
        step = _load_checkpoint(resume_from, accelerator.unwrap_model(unet), optimizer, lr_scheduler, s.run_dict())

    bar = tqdm(total=s.max_train_steps, initial=step, desc="dreambooth", disable=not s.progress)
    while step < s.max_train_steps:
        for micro in range(s.gradient_accumulation_steps):
            gen = step_generator(s.seed, step * s.gradient_accumulation_steps + micro)
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
            _save_checkpoint(
                Path(s.output_dir) / CHECKPOINTS / f"step-{step:06d}", accelerator.unwrap_model(unet), optimizer,
                lr_scheduler, step, s.run_dict(),
            )
            for old in checkpoint_dirs(s.output_dir)[: -s.keep_checkpoints]:
                shutil.rmtree(old)
        if s.validation_prompt and (step % s.validation_steps == 0 or step == s.max_train_steps):
            unet.eval()
            _validate(pipe, s, step)
            unet.train()
    bar.close()
    _save_result(pipe, accelerator.unwrap_model(unet), s)
    return Path(s.output_dir)

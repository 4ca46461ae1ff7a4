"""The data of a DreamBooth run: instance images read from a folder, the class-image cache of prior
preservation (generated once by the base model, with a hidden manifest of its prompt and
resolution), the frozen encoders' latents and prompt embeddings, and the random training batches.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, ImageOps

from .settings import check_resolution

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASS_MANIFEST = ".agentsd_class_images.json"  # hidden: not taken for an image


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
def encode_images(vae: Any, images: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the frozen VAE's latent distribution of ``images``, already scaled.

    A training latent is ``mean + std * noise``: the same as encoding every step, at no cost. The
    images go through the VAE ``batch_size`` at a time (a hundred class images at once would not
    fit in memory).
    """
    scale = vae.config.scaling_factor
    means, stds = [], []
    for chunk in images.split(batch_size):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean * scale)
        stds.append(dist.std * scale)
    return torch.cat(means), torch.cat(stds)


class Batch(NamedTuple):
    """One training batch: instance samples first, then class samples (prior preservation)."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    num_instance: int


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

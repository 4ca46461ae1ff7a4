"""Training harness of the embedded reference model (:data:`eval.REFERENCE_MODEL`).

``scripts/train_reference_model.py`` is its command line; the options it parses (an
:class:`argparse.Namespace`) are what :func:`train` and :class:`Trainer` read. Data: captioned
64 x 64 images from :mod:`eval.reference.shapes` ("a red circle on a blue background"), never the held-out
combinations. The models are built by :mod:`eval.reference.components`.

Phases:
  1. AutoencoderKL (4x downsampling: 64 px -> 4 x 16 x 16 latents), ``--vae-steps``.
  2. The training images are encoded once (cached in the checkpoint folder); the UNet and the
     CLIP text encoder are trained jointly with the DDPM epsilon loss (min-SNR weighting,
     classifier-free-guidance caption dropout, warmup + cosine LR, EMA), ``--steps``.
  3. The EMA weights are exported with a PNDM (PLMS) scheduler into ``--out``
     (``StableDiffusionPipeline.save_pretrained``; ``PixArtAlphaPipeline`` for ``--denoiser dit``),
     reloaded from disk, and the prompt adherence
     on held-out prompts is measured with the attribute classifier (:mod:`eval.reference.adherence`); the
     model card ``README.md`` (from the template ``eval/reference/model_card.md``) and
     ``training_info.json`` are written into that folder too.

Checkpoints (weights, EMA, optimisers, LR schedulers, step, RNG states) and the latent cache hold
only tensors, numbers, strings, lists and dicts; they are written to a temporary file and renamed,
and loaded with ``torch.load(..., weights_only=True)``: no pickled code runs, and a damaged or
changed file ends the run with a one-line error naming it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from agentsd.training import unsafe_file_error
from eval.reference import shapes
from eval.reference.adherence import CLASSIFIER_FILE
from eval.reference import generation_kwargs
from eval.reference.components import (
    ModelConfig,
    build_denoiser,
    build_inference_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_train_scheduler,
    build_vae,
    count_parameters,
    freeze_vae_logvar,
)

CHECKPOINT = "checkpoint.pt"
LATENT_CACHE = "latents.pt"
CHECKPOINT_VERSION = 2  # 1: pickled, no longer loaded
#: options that must not change when resuming (they define the training run); --steps may grow
RUN_KEYS = (
    "seed", "steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "ema_decay",
    "cfg_drop", "snr_gamma", "noise_offset", "n_train_images", "vae_steps", "vae_batch_size", "vae_lr",
    "text_hidden", "text_layers", "unet_channels", "vae_channels", "denoiser", "dit_width", "dit_layers", "dit_heads",
    "dit_patch", "image_size", "vae_from", "text_from",
)
#: what a PixArt transformer takes beside the latents, text and timestep (no size conditions)
NO_ADDED_CONDITIONS = {"resolution": None, "aspect_ratio": None}
#: PixArt's pipelines pad prompts to this many tokens
DIT_TEXT_POSITIONS = 120
#: the model card template: blocks of markdown with ``{placeholders}`` (see :func:`render_model_card`)
CARD_TEMPLATE = Path(__file__).resolve().with_name("model_card.md")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """Network sizes from the options."""
    dit = args.denoiser == "dit"
    return ModelConfig(
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        vae_channels=tuple(args.vae_channels),
        unet_channels=tuple(args.unet_channels),
        denoiser=args.denoiser,
        dit_width=args.dit_width,
        dit_layers=args.dit_layers,
        dit_heads=args.dit_heads,
        dit_patch=args.dit_patch,
        image_size=args.image_size,
        text_positions=DIT_TEXT_POSITIONS if dit else ModelConfig.text_positions,
    )


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define the run (compared on resume)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in RUN_KEYS}


# ----------------------------------------------------------------------------- helpers


def lr_lambda(warmup: int, total: int, floor: float):
    """Linear warmup to 1, then cosine decay to ``floor``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def render_batch(seed: int, step: int, n: int, size: int = 64) -> torch.Tensor:
    """``n`` fresh training images for VAE step ``step`` (depends only on seed and step), in [-1, 1]."""
    rng = np.random.default_rng([seed, 1, step])
    imgs = np.stack([np.asarray(shapes.render(a, size=size, rng=rng))
                     for a in (shapes.sample_attributes(rng) for _ in range(n))])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch, numpy, python) as tensors and numbers (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))


def safe_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only.

    Raises:
        ValueError: one line naming ``path``, for a file that is damaged or holds anything else.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is not what this script writes
        raise unsafe_file_error(path, err) from None


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename (``obj``: what :func:`safe_load` reads back)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def folder_size_mb(folder: Path) -> float:
    """Total size of the files under ``folder`` in MB."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6



def load_text_encoder(encoder: torch.nn.Module, folder: Path) -> None:
    """Load a trained :class:`~transformers.CLIPTextModel` of the same vocabulary and width into
    ``encoder``. If ``encoder`` has more positions (PixArt's pipelines pad prompts to 120 tokens,
    Stable Diffusion's to 77), the trained position embeddings fill the first ones; the others are
    only ever seen by padding, which the denoiser masks."""
    from transformers import CLIPTextModel

    trained = CLIPTextModel.from_pretrained(folder, local_files_only=True).state_dict()
    own = encoder.state_dict()
    key = next(k for k in own if k.endswith("position_embedding.weight"))
    if own[key].shape[0] < trained[key].shape[0] or any(
            own[k].shape != v.shape for k, v in trained.items() if k != key and k in own):
        raise SystemExit(f"--text-from {folder.parent}: its text encoder does not fit this one (vocabulary, width, "
                         "layers or positions differ)")
    positions = own[key].clone()
    positions[: trained[key].shape[0]] = trained[key]
    encoder.load_state_dict({**trained, key: positions}, strict=False)

class EMA:
    """Exponential moving average of a list of parameters (decay warms up as (1+s)/(10+s))."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, [p.detach() for p in self.params], alpha=1.0 - d)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s)


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Holds the models, optimisers and progress of one training run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.ckpt_dir = Path(args.ckpt_dir)
        self.start = time.time()
        self.last_ckpt = time.time()
        self.cfg = model_config(args)
        self.progress = not args.no_progress

        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)
        self.tokenizer = build_tokenizer(max_length=self.cfg.text_positions)
        self.text_encoder = build_text_encoder(self.cfg, vocab_size=len(self.tokenizer))
        self.vae = build_vae(self.cfg)
        if args.vae_from:  # a trained autoencoder: phase 1 is skipped
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(Path(args.vae_from) / "vae", local_files_only=True)
        if args.text_from:  # a trained text encoder to start from; it goes on training with the denoiser
            load_text_encoder(self.text_encoder, Path(args.text_from) / "text_encoder")
        #: the denoiser (a UNet, or a PixArt-layout transformer); "unet" in checkpoints either way
        self.unet = build_denoiser(self.cfg)
        freeze_vae_logvar(self.vae)
        self.noise_scheduler = build_train_scheduler()
        self.gen = torch.Generator().manual_seed(args.seed)

        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.vae_sched = torch.optim.lr_scheduler.LambdaLR(
            self.vae_opt, lr_lambda(min(100, args.vae_steps // 10), args.vae_steps, 0.1)
        )
        self.train_params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(self.train_params, lr=args.lr, weight_decay=args.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(args.warmup_steps, args.steps, args.min_lr_ratio)
        )
        self.ema = EMA(self.train_params, args.ema_decay)

        self.phase = "unet" if args.vae_from else "vae"
        self.vae_step = 0
        self.unet_step = 0
        self.scaling_factor: float | None = None
        self.elapsed = {"vae": 0.0, "latents": 0.0, "unet": 0.0}
        self.loss_log: list[tuple[str, int, float]] = []
        self.commands: list[str] = []
        self.stopped_early = False

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "run_config": run_config(self.args),
            "model_config": self.cfg.to_dict(),
            "phase": self.phase,
            "vae_step": self.vae_step,
            "unet_step": self.unet_step,
            "vae": self.vae.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "vae_sched": self.vae_sched.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema": self.ema.shadow,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "gen": self.gen.get_state(),
            "rng": rng_state(),
            "scaling_factor": self.scaling_factor,
            "elapsed": self.elapsed,
            "loss_log": self.loss_log,
            "commands": self.commands,
        }

    def save_checkpoint(self) -> None:
        self.make_ckpt_dir()
        atomic_save(self.state_dict(), self.ckpt_dir / CHECKPOINT)
        self.last_ckpt = time.time()

    def make_ckpt_dir(self) -> None:
        """Create the checkpoint folder, with a ``.gitignore`` that keeps it out of git."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        ignore = self.ckpt_dir / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# training checkpoints of scripts/train_reference_model.py\n*\n")

    def load_checkpoint(self) -> bool:
        path = self.ckpt_dir / CHECKPOINT
        if not path.exists():
            return False
        try:
            state = safe_load(path)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            found = state.get("version") if isinstance(state, dict) else None
            raise SystemExit(f"{path}: unsupported checkpoint version {found} (expected {CHECKPOINT_VERSION})")
        try:  # a checkpoint of another model or run ends the run (it has written nothing yet)
            mine = run_config(self.args)
            diff = {k: (state["run_config"].get(k), v) for k, v in mine.items()
                    if state["run_config"].get(k) != v and k != "steps"}
            if diff:
                lines = "\n".join(
                    f"  --{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items()
                )
                raise SystemExit(f"{path} was made with other options; pass the same ones to resume:\n{lines}")
            self.phase = state["phase"]
            self.vae_step = state["vae_step"]
            self.unet_step = state["unet_step"]
            old_steps = state["run_config"]["steps"]
            if old_steps != self.args.steps:
                if self.args.steps < self.unet_step:
                    raise SystemExit(f"--steps {self.args.steps} is below the checkpoint's step {self.unet_step}")
                print(f"--steps changed from {old_steps} to {self.args.steps}: the cosine LR schedule is "
                      "stretched to the new total (the run is then no longer reproducible in one go)")
                if self.phase == "done" and self.unet_step < self.args.steps:
                    self.phase = "unet"
            self.vae.load_state_dict(state["vae"])
            self.vae_opt.load_state_dict(state["vae_opt"])
            self.vae_sched.load_state_dict(state["vae_sched"])
            self.unet.load_state_dict(state["unet"])
            self.text_encoder.load_state_dict(state["text_encoder"])
            with torch.no_grad():
                for s, v in zip(self.ema.shadow, state["ema"]):
                    s.copy_(v)
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            self.gen.set_state(state["gen"])
            set_rng_state(state["rng"])
            self.scaling_factor = state["scaling_factor"]
            self.elapsed = state["elapsed"]
            self.loss_log = [tuple(x) for x in state["loss_log"]]
            self.commands = list(state["commands"])
        except (AttributeError, KeyError, IndexError, RuntimeError, TypeError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise SystemExit(f"{path} does not fit this model and run: {reason}") from None
        return True

    def time_is_up(self) -> bool:
        m = self.args.max_minutes
        return m is not None and time.time() - self.start >= m * 60.0

    def maybe_checkpoint(self) -> None:
        if time.time() - self.last_ckpt >= self.args.ckpt_minutes * 60.0:
            self.save_checkpoint()

    # ------------------------------------------------------------------ phase 1

    def train_vae(self) -> bool:
        """Train the autoencoder; return False if stopped by the time budget."""
        args = self.args
        self.vae.train()
        bar = tqdm(total=args.vae_steps, initial=self.vae_step, desc="vae", disable=not self.progress)
        running = None
        while self.vae_step < args.vae_steps:
            if self.time_is_up():
                bar.close()
                return False
            t0 = time.time()
            x = render_batch(args.seed, self.vae_step, args.vae_batch_size, args.image_size)
            posterior = self.vae.encode(x).latent_dist
            rec = self.vae.decode(posterior.sample(generator=self.gen)).sample
            loss = F.mse_loss(rec, x) + F.l1_loss(rec, x)
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_opt.step()
            self.vae_sched.step()
            self.vae_step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if self.vae_step % 50 == 0 or self.vae_step == args.vae_steps:
                self.loss_log.append(("vae", self.vae_step, running))
            self.elapsed["vae"] += time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            self.maybe_checkpoint()
        bar.close()
        return True

    # ------------------------------------------------------------------ latents

    @torch.no_grad()
    def latent_cache(self) -> dict[str, Any]:
        """Encode the training set once (posterior means), cached beside the checkpoint."""
        args = self.args
        path = self.ckpt_dir / LATENT_CACHE
        fingerprint = float(sum(p.double().sum() for p in self.vae.parameters()))
        key = {"seed": args.seed, "n": args.n_train_images, "vae": fingerprint, "size": args.image_size}
        if path.exists():
            try:
                cache = safe_load(path)
            except ValueError as err:
                print(f"{err}; encoding the training set again")
                cache = None
            if isinstance(cache, dict) and cache.get("key") == key:
                return cache
        t0 = time.time()
        data = shapes.make_dataset(args.n_train_images, seed=args.seed + 7919, size=args.image_size)
        self.vae.eval()
        means = []
        for i in tqdm(range(0, len(data.images), 256), desc="encode", disable=not self.progress):
            x = images_to_tensor(data.images[i : i + 256])
            means.append(self.vae.encode(x).latent_dist.mean)
        mean = torch.cat(means)
        captions = sorted(set(data.captions))
        index = {c: i for i, c in enumerate(captions)}
        cache = {
            "key": key,
            "mean": mean.half(),
            "caption_index": torch.tensor([index[c] for c in data.captions], dtype=torch.long),
            "captions": captions,
            # scale the latents to unit variance (as SD's 0.18215)
            "scaling_factor": float(1.0 / mean.std()),
        }
        self.make_ckpt_dir()
        atomic_save(cache, path)
        self.elapsed["latents"] += time.time() - t0
        return cache

    # ------------------------------------------------------------------ phase 2

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, padded as the pipeline pads them."""
        out = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, tokens: torch.Tensor,
                      masks: torch.Tensor) -> torch.Tensor:
        """The denoiser's noise prediction for the captions ``caption`` (rows of ``tokens`` and
        ``masks``), the text encoded as its pipeline encodes it: a UNet (StableDiffusionPipeline)
        sees the whole padded prompt, a PixArt transformer (PixArtAlphaPipeline) the masked one,
        and masks the padding in its cross-attention."""
        uniq, inverse = torch.unique(caption, return_inverse=True)
        if self.cfg.denoiser == "dit":
            text = self.text_encoder(tokens[uniq], attention_mask=masks[uniq]).last_hidden_state[inverse]
            return self.unet(noisy, encoder_hidden_states=text, encoder_attention_mask=masks[caption], timestep=t,
                             added_cond_kwargs=NO_ADDED_CONDITIONS).sample
        text = self.text_encoder(tokens[uniq]).last_hidden_state[inverse]
        return self.unet(noisy, t, encoder_hidden_states=text).sample

    def train_unet(self, cache: dict[str, Any]) -> bool:
        """Train UNet + text encoder; return False if stopped early."""
        args = self.args
        self.scaling_factor = cache["scaling_factor"]
        latents = cache["mean"]
        caption_index = cache["caption_index"]
        tokens, masks = self.tokenize(list(cache["captions"]) + [""])  # last row: the unconditional caption
        empty = len(cache["captions"])
        latent_std = float(torch.exp(0.5 * self.vae.quant_conv.bias.detach()[4:]).mean())
        alphas = self.noise_scheduler.alphas_cumprod
        snr = alphas / (1.0 - alphas)
        n = latents.shape[0]
        self.unet.train()
        self.text_encoder.train()
        bar = tqdm(total=args.steps, initial=self.unet_step, desc="unet", disable=not self.progress)
        running = None
        while self.unet_step < args.steps:
            if self.time_is_up() or (args.stop_at_step is not None and self.unet_step >= args.stop_at_step):
                bar.close()
                return False
            t0 = time.time()
            b = args.batch_size
            idx = torch.randint(n, (b,), generator=self.gen)
            z = latents[idx].float()
            z = (z + latent_std * torch.randn(z.shape, generator=self.gen)) * self.scaling_factor
            noise = torch.randn(z.shape, generator=self.gen)
            if args.noise_offset:
                noise = noise + args.noise_offset * torch.randn(b, z.shape[1], 1, 1, generator=self.gen)
            t = torch.randint(0, len(alphas), (b,), generator=self.gen)
            drop = torch.rand(b, generator=self.gen) < args.cfg_drop
            cap = torch.where(drop, torch.full_like(idx, empty), caption_index[idx])
            noisy = self.noise_scheduler.add_noise(z, noise, t)
            pred = self.predict_noise(noisy, t, cap, tokens, masks)
            per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            if args.snr_gamma > 0:
                s = snr[t]
                per_sample = per_sample * torch.clamp(s, max=args.snr_gamma) / s
            loss = per_sample.mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.train_params, 1.0)
            self.opt.step()
            self.sched.step()
            self.ema.update(self.unet_step)
            self.unet_step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if self.unet_step % 50 == 0 or self.unet_step == args.steps:
                self.loss_log.append(("unet", self.unet_step, running))
            self.elapsed["unet"] += time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{self.sched.get_last_lr()[0]:.2e}")
            self.maybe_checkpoint()
        bar.close()
        return True

    # ------------------------------------------------------------------ export

    def export(self) -> None:
        """Save the EMA weights as a StableDiffusionPipeline (a PixArtAlphaPipeline for a DiT)
        into ``--out``."""
        from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline

        unet = copy.deepcopy(self.unet)
        text_encoder = copy.deepcopy(self.text_encoder)
        self.ema.copy_to(list(unet.parameters()) + list(text_encoder.parameters()))
        vae = copy.deepcopy(self.vae)
        vae.register_to_config(scaling_factor=self.scaling_factor)
        if self.cfg.denoiser == "dit":
            pipe = PixArtAlphaPipeline(tokenizer=self.tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                                       transformer=unet.eval(), scheduler=build_inference_scheduler())
            pipe.save_pretrained(self.out, safe_serialization=True)
            return
        pipe = StableDiffusionPipeline(
            vae=vae.eval(),
            text_encoder=text_encoder.eval(),
            tokenizer=self.tokenizer,
            unet=unet.eval(),
            scheduler=build_inference_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(self.out, safe_serialization=True)


# ----------------------------------------------------------------------------- evaluation
# ----------------------------------------------------------------------------- evaluation


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Reload the saved pipeline from disk and score its prompt adherence.

    With several ``--guidance`` values, each is scored on the training-combination prompts and the
    best one (all attributes correct) is used for the held-out prompts.
    """
    from PIL import Image

    from eval.reference import load_pipeline
    from eval.reference.adherence import evaluate_pipeline, load_classifier

    t0 = time.time()
    pipe = load_pipeline(args.out)
    classifier = load_classifier()
    common = dict(num_inference_steps=args.eval_steps, batch_size=args.eval_batch_size,
                  classifier=classifier, progress=not args.no_progress)
    guidances = list(args.guidance)
    train: dict[str, Any] = {}
    if args.eval_train_n > 0:
        for g in guidances:
            train[str(g)], _ = evaluate_pipeline(
                pipe, shapes.train_prompts(args.eval_train_n), seed=100000, guidance_scale=g, **common)
        best = max(guidances, key=lambda g: (train[str(g)]["all_correct"],
                                             sum(train[str(g)][k] for k in ("shape", "color", "background"))))
    else:
        best = guidances[0]
    heldout, images = evaluate_pipeline(
        pipe, shapes.heldout_prompts(args.eval_n), seed=0, guidance_scale=best, **common)
    result: dict[str, Any] = {"heldout": heldout, "guidance": best, "train_combos": train}
    # a grid of the first 24 held-out samples (two per held-out prompt)
    k = min(24, len(images))
    if k:
        cols, side = 12, images.shape[1]
        rows = math.ceil(k / cols)
        grid = np.zeros((rows * side, cols * side, 3), dtype=np.uint8)
        for i in range(k):
            r, c = divmod(i, cols)
            grid[r * side : (r + 1) * side, c * side : (c + 1) * side] = images[i]
        Image.fromarray(grid).save(Path(args.out) / "samples.png")
    result["eval_seconds"] = round(time.time() - t0, 1)
    return result


def _fmt_scores(s: dict[str, Any]) -> str:
    return " | ".join(f"{100 * s[k]:.1f} %" for k in ("all_correct", "shape", "color", "background"))



# ----------------------------------------------------------------------------- model card


def training_info(trainer: Trainer, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """What ``training_info.json`` holds: the run, the model, the time spent and the adherence."""
    args = trainer.args
    return {
        "run_config": run_config(args),
        "model_config": trainer.cfg.to_dict(),
        "parameters": {
            "unet": count_parameters(trainer.unet),
            "text_encoder": count_parameters(trainer.text_encoder),
            "vae": count_parameters(trainer.vae),
        },
        "vae_steps_done": trainer.vae_step,
        "unet_steps_done": trainer.unet_step,
        "stopped_early": trainer.stopped_early,
        "training_minutes": {k: round(v / 60.0, 1) for k, v in trainer.elapsed.items()},
        "training_minutes_total": round(sum(trainer.elapsed.values()) / 60.0, 1),
        "threads": args.threads,
        "scaling_factor": trainer.scaling_factor,
        "commands": trainer.commands,
        "final_loss": {ph: v for ph, _, v in trainer.loss_log},
        "adherence": metrics,
    }


def card_blocks(text: str) -> dict[str, str]:
    """The named blocks of the card template: each starts after a ``<!-- block NAME -->`` line
    (what comes before the first one is a comment for the reader)."""
    parts = re.split(r"^<!-- block (\w+) -->\n", text, flags=re.MULTILINE)
    return {name: block.strip("\n") for name, block in zip(parts[1::2], parts[2::2])}


def render_model_card(
    info: dict[str, Any], size_mb: float, has_classifier: bool = True, template: Path = CARD_TEMPLATE
) -> str:
    """The model card ``README.md`` of a pipeline folder from its ``training_info.json`` (``info``),
    its size in MB and whether the attribute classifier lies in it too: the template's ``card``
    block filled with :meth:`str.format`, with the ``adherence`` (or ``not_measured``),
    ``classifier_note`` and ``stopped_early`` blocks in their places."""
    blocks = card_blocks(template.read_text())
    run, model, counts, minutes = info["run_config"], info["model_config"], info["parameters"], info["training_minutes"]
    metrics = info.get("adherence")
    if metrics:
        heldout = metrics["heldout"]
        rows = [blocks["train_row"].format(guidance=g, n=t["n"], scores=_fmt_scores(t))
                for g, t in metrics.get("train_combos", {}).items()]
        adherence = blocks["adherence"].format(
            steps=heldout["num_inference_steps"], guidance=heldout["guidance_scale"], n=heldout["n"],
            scores=_fmt_scores(heldout), train_rows="\n".join(rows),
        )
    else:
        adherence = blocks["not_measured"]
    scaling = info.get("scaling_factor")
    # runs recorded before the DiT option have a UNet at 64 px and a trained autoencoder
    run = {"denoiser": "unet", "image_size": 64, "vae_from": None, "text_from": None, **run}
    model = {"dit_width": None, "dit_layers": None, "dit_heads": None, "dit_patch": 1, **model}
    latent = run["image_size"] // 4
    grid = latent // model["dit_patch"] if run["denoiser"] == "dit" else latent
    dit = run["denoiser"] == "dit"
    sizes = dict(unet_params=f"{counts['unet'] / 1e6:.2f}", unet_channel_list=list(model["unet_channels"]),
                 latent=latent, grid=grid, tokens=grid * grid, dit_width=model["dit_width"],
                 dit_layers=model["dit_layers"], dit_heads=model["dit_heads"], dit_patch=model["dit_patch"])
    card = blocks["card"].format(
        **run,
        kind="PixArt" if dit else "Stable Diffusion",
        pipeline_class="PixArtAlphaPipeline" if dit else "StableDiffusionPipeline",
        folder="eval/reference/dit" if dit else "eval/reference/unet",
        denoiser_name="transformer" if dit else "UNet",
        denoiser_row=blocks["dit_row" if dit else "unet_row"].format(**sizes),
        vae_training=blocks["vae_reused" if run["vae_from"] else "vae_trained"].format(
            vae_steps_done=info["vae_steps_done"], **run),
        latent=latent,
        n_train_combos=len(shapes.TRAIN_COMBOS),
        n_heldout_combos=len(shapes.HELDOUT_COMBOS),
        text_params=f"{counts['text_encoder'] / 1e6:.2f}",
        text_start=f", starting from `{run['text_from']}`'s" if run["text_from"] else "",
        vae_data=(f"The autoencoder is `{run['vae_from']}`'s." if run["vae_from"] else
                  "The autoencoder is trained on freshly rendered images of the training combinations."),
        vae_params=f"{counts['vae'] / 1e6:.2f}",
        vae_channel_list=list(model["vae_channels"]),
        text_layer_count=model["text_layers"],
        text_width=model["text_hidden"],
        scaling_factor=f"{scaling:.4f}" if scaling is not None else "unknown",
        unet_steps_done=info["unet_steps_done"],
        cfg_drop_percent=f"{100 * run['cfg_drop']:.0f}",
        minutes_total=info["training_minutes_total"],
        threads=info["threads"],
        minutes_vae=minutes["vae"],
        minutes_latents=minutes["latents"],
        minutes_unet=minutes["unet"],
        stopped_early=blocks["stopped_early"] if info["stopped_early"] else "",
        classifier_note=blocks["classifier_note"] if has_classifier else "",
        commands="\n".join(info["commands"]),
        adherence=adherence,
        size_mb=f"{size_mb:.1f}",
    )
    card = "\n".join(line.rstrip() for line in card.splitlines())
    return re.sub(r"\n{3,}", "\n\n", card).strip("\n") + "\n"


def write_model_card(trainer: Trainer, metrics: dict[str, Any] | None) -> None:
    """Write ``training_info.json`` and the model card ``README.md`` into ``--out``."""
    out = Path(trainer.args.out)
    info = training_info(trainer, metrics)
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    has_classifier = (out / CLASSIFIER_FILE).exists()
    (out / "README.md").write_text(render_model_card(info, folder_size_mb(out), has_classifier))


# ----------------------------------------------------------------------------- the run


def train(args: argparse.Namespace, command: str) -> int:
    """Run (or resume) the training, export, evaluate and write the model card; ``command`` (how the
    script was called) is recorded in the card. Returns the exit status."""
    torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    if args.resume:
        if trainer.load_checkpoint():
            print(f"resumed from {trainer.ckpt_dir / CHECKPOINT}: phase {trainer.phase}, "
                  f"vae step {trainer.vae_step}, unet step {trainer.unet_step}")
        else:
            print(f"no checkpoint in {trainer.ckpt_dir}; starting from scratch")
    elif (trainer.ckpt_dir / CHECKPOINT).exists():
        print(f"warning: {trainer.ckpt_dir / CHECKPOINT} exists and will be overwritten (use --resume to continue)")
    trainer.commands.append(command.strip())
    print(f"parameters: unet {count_parameters(trainer.unet) / 1e6:.2f} M, text encoder "
          f"{count_parameters(trainer.text_encoder) / 1e6:.2f} M, vae {count_parameters(trainer.vae) / 1e6:.2f} M")

    finished = True
    if trainer.phase == "vae":
        finished = trainer.train_vae()
        if finished:
            trainer.phase = "unet"
        trainer.save_checkpoint()
    if finished and trainer.phase == "unet":
        cache = trainer.latent_cache()
        trainer.scaling_factor = cache["scaling_factor"]
        finished = trainer.train_unet(cache)
        if finished:
            trainer.phase = "done"
        trainer.save_checkpoint()
    if not finished and args.stop_at_step is not None and not trainer.time_is_up():
        print(f"stopped at unet step {trainer.unet_step}; checkpoint in {trainer.ckpt_dir} (continue with --resume)")
        return 0
    if not finished:
        trainer.stopped_early = True
        if trainer.phase == "vae":
            print(f"time budget reached at vae step {trainer.vae_step}: the autoencoder is not trained yet, "
                  "nothing to export (continue with --resume)")
            return 0
        print(f"time budget reached at unet step {trainer.unet_step}; exporting the current EMA weights "
              "(continue with --resume)")
    trainer.export()
    metrics = None if args.no_eval else evaluate(args)
    write_model_card(trainer, metrics)
    if metrics:
        print(json.dumps(metrics, indent=2))
    print(f"saved {args.out} ({folder_size_mb(Path(args.out)):.1f} MB)")
    return 0

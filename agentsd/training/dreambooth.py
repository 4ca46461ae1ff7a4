"""The DreamBooth job: :func:`train_dreambooth` loads the base pipeline, encodes the data, adds
LoRA adapters if asked, patches the UNet with AgentSD on every step, trains under accelerate
(checkpoints, resumption, validation images, a tqdm bar) and saves the result with its settings.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import save_config
from ..patch import apply_patch, store_config
from .checkpoints import (
    CHECKPOINTS,
    checkpoint_dirs,
    register_checkpoint_hooks,
    save_checkpoint,
    trainable_parameters,
    verify_checkpoint,
)
from .data import (
    encode_images,
    encode_prompt,
    generate_class_images,
    load_images,
    missing_class_images,
    sample_batch,
    step_generator,
)
from .loss import dreambooth_loss
from .settings import DreamBoothSettings

SETTINGS_FILE = "dreambooth.json"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


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
    and they train data-parallel (see :mod:`agentsd.training`); it returns in every process once the
    result is written.

    Args:
        settings: what to train and how.
        resume: ``True`` continues from the latest checkpoint in ``output_dir`` (from scratch if
            there is none), a path continues from that checkpoint folder. Either must have been
            made with the same run settings and number of processes.

    Returns:
        ``output_dir``: a full pipeline (``save_pretrained``) or, with LoRA, the LoRA weights
        (``pytorch_lora_weights.safetensors``), plus ``agentsd_config`` storage (see
        :mod:`agentsd.training`) and ``dreambooth.json`` (the settings).

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
    step = verify_checkpoint(resume_from, accelerator, run) if resume_from is not None else 0

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
    params = list(trainable_parameters(unet).values())
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate)
    # the prepared schedule steps once per process at every optimisation step
    lr_scheduler = get_scheduler(
        s.lr_scheduler, optimizer, num_warmup_steps=s.lr_warmup_steps * processes,
        num_training_steps=s.max_train_steps * processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    register_checkpoint_hooks(accelerator)
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
            save_checkpoint(accelerator, Path(s.output_dir) / CHECKPOINTS / f"step-{step:06d}", step, run)
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

"""DreamBooth finetuning of a Stable Diffusion pipeline with AgentSD on every step.

Imported only when used (``import agentsd`` does not load it, nor accelerate or peft); needs the
``agentsd[train]`` extra. ``scripts/train_dreambooth.py`` is its command line.

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

Data-parallel training (``accelerate launch --num_processes N``): every process draws its own
``batch_size`` instance (and class) samples per micro-step, so a step sees ``N * batch_size``
instance samples (times ``gradient_accumulation_steps``); the gradients are averaged, so every process
holds the same weights. Process 0 draws what a one-process run draws. Missing class images are
split between the processes; checkpoints, validation images and the result are written once, by the
main process.

Modules: :mod:`.settings` (:class:`DreamBoothSettings`, :data:`RUN_FIELDS`), :mod:`.data`
(instance images, the class-image cache, encoding, batches), :mod:`.loss`, :mod:`.checkpoints`
(``save_state``/``load_state`` with a JSON record and sha256 checks), :mod:`.dreambooth` (the job).
"""
from .checkpoints import CHECKPOINT_FILE, CHECKPOINTS, checkpoint_dirs, unsafe_file_error
from .data import (
    CLASS_MANIFEST,
    IMAGE_EXTENSIONS,
    Batch,
    encode_images,
    encode_prompt,
    generate_class_images,
    list_images,
    load_images,
    missing_class_images,
    sample_batch,
    step_generator,
)
from .dreambooth import LORA_TARGETS, SETTINGS_FILE, load_pipeline, train_dreambooth
from .loss import dreambooth_loss
from .settings import RUN_FIELDS, DreamBoothSettings, check_resolution

__all__ = [
    "Batch",
    "CHECKPOINTS",
    "CHECKPOINT_FILE",
    "CLASS_MANIFEST",
    "DreamBoothSettings",
    "IMAGE_EXTENSIONS",
    "LORA_TARGETS",
    "RUN_FIELDS",
    "SETTINGS_FILE",
    "check_resolution",
    "checkpoint_dirs",
    "dreambooth_loss",
    "encode_images",
    "encode_prompt",
    "generate_class_images",
    "list_images",
    "load_images",
    "load_pipeline",
    "missing_class_images",
    "sample_batch",
    "step_generator",
    "train_dreambooth",
    "unsafe_file_error",
]

"""The benchmark harness of agentsd: latency and quality of training-free UNet accelerators side by
side. The reference models it runs on offline, and the procedural captioned-shape data they were
trained on, are the package :mod:`eval.reference`, one folder per model."""
from eval.reference import model_folder as _model_folder

#: The embedded reference model, ``eval/reference/unet``: a small diffusers text-to-image pipeline
#: folder (``StableDiffusionPipeline.from_pretrained(eval.REFERENCE_MODEL)``, offline) and its
#: attribute classifier. It lives in the checkout, beside the harness, not in the wheel.
REFERENCE_MODEL = _model_folder("unet")

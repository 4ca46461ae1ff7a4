"""The benchmark harness of agentsd: latency and quality of training-free UNet accelerators side by
side, the embedded reference model it runs on offline, and the procedural captioned-shape data
that model was trained on."""
from pathlib import Path

#: The embedded reference model: a small diffusers text-to-image pipeline folder
#: (``StableDiffusionPipeline.from_pretrained(eval.REFERENCE_MODEL)``, offline) and its
#: attribute classifier. It lives in the checkout, beside the harness, not in the wheel.
REFERENCE_MODEL = Path(__file__).resolve().parent / "reference_model"

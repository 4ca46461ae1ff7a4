"""The reference models of the benchmark harness: small text-to-image models trained by this
project on procedural captioned shapes, so that FID, prompt adherence and fidelity can be measured
offline. They live in the checkout, apart from the harness, not in the wheel.

Each model has a folder of its own here, registered in :data:`MODELS`: ``unet``
(``eval/reference/unet/``) is a diffusers ``StableDiffusionPipeline`` folder with its attribute
classifier, training record and model card. Shared by the models: :mod:`eval.reference.shapes`
(the procedural data), :mod:`eval.reference.adherence` (the attribute classifier and prompt
adherence); the UNet model's builders and training are :mod:`eval.reference.components` and
:mod:`eval.reference.training` (card template ``model_card.md``).
"""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: the reference models by name: the folder each is shipped in
MODELS: dict[str, Path] = {
    "unet": _HERE / "unet",
}


def model_folder(name: str) -> Path:
    """The folder of the reference model ``name`` (a key of :data:`MODELS`).

    Raises:
        ValueError: ``name`` is not a known reference model; the message names the known ones.
    """
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(k) for k in MODELS)
        raise ValueError(f"unknown reference model {name!r}; known: {known}") from None

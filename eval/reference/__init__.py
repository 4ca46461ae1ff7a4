"""The reference models of the benchmark harness: small text-to-image models trained by this
project on procedural captioned shapes, so that FID, prompt adherence and fidelity can be measured
offline. They live in the checkout, apart from the harness, not in the wheel.

Each model has a folder of its own here, registered in :data:`MODELS`: ``unet``
(``eval/reference/unet/``) is a diffusers ``StableDiffusionPipeline`` folder with its attribute
classifier, training record and model card; ``dit`` (``eval/reference/dit/``) is a
``PixArtAlphaPipeline`` folder of a small PixArt-layout transformer, trained the same way. Shared
by the models: :mod:`eval.reference.shapes` (the procedural data), :mod:`eval.reference.adherence`
(the attribute classifier and prompt adherence), :mod:`eval.reference.components` (the builders)
and :mod:`eval.reference.training` (the training harness; card template ``model_card.md``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent

#: the reference models by name: the folder each is shipped in
MODELS: dict[str, Path] = {
    "unet": _HERE / "unet",
    "dit": _HERE / "dit",
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


def load_pipeline(name_or_folder: str | Path) -> Any:
    """The pipeline of a reference model (a name of :data:`MODELS`) or of a folder trained like one,
    loaded offline with the pipeline class its ``model_index.json`` names."""
    from diffusers import DiffusionPipeline

    folder = MODELS[name_or_folder] if name_or_folder in MODELS else Path(name_or_folder)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generation_kwargs(pipe: Any) -> dict[str, Any]:
    """What a call of ``pipe`` needs beside the prompt to draw at the size it is asked for:
    PixArt pipelines would otherwise move the size to the nearest of their trained aspect-ratio
    bins (``use_resolution_binning``), which the reference DiT was not trained at."""
    return {"use_resolution_binning": False} if "use_resolution_binning" in _parameters(pipe) else {}


def _parameters(pipe: Any) -> Any:
    import inspect

    return inspect.signature(type(pipe).__call__).parameters

"""A pytest plugin for running diffusers' own tests offline, with every pipeline patched or not.

``scripts/run_diffusers_tests.py`` loads it (``-p diffusers_plugin``). It gives
``CLIPTokenizer.from_pretrained("hf-internal-testing/tiny-random-clip")``, the one download of the
tests' ``get_dummy_components``, a local stand-in (:func:`tiny.tokenizer`, a character-level CLIP
tokenizer), so the tests run offline; the tests that compare images with hard-coded pixel slices
then fail, patched or not. With ``AGENTSD_PATCH=1`` every pipeline that is built with a
``UNet2DConditionModel`` gets ``agentsd.apply_patch`` with the settings of ``AGENTSD_SETTINGS``
(JSON; default ``{"agent_fraction": 1.0}``, so that every UNet call of the tests' few steps runs
the agent phase) as soon as it registers its modules.
"""
from __future__ import annotations

import json
import os

import tiny

STAND_IN = "hf-internal-testing/tiny-random-clip"


def pytest_configure(config) -> None:
    from transformers import CLIPTokenizer

    load = CLIPTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        return tiny.tokenizer() if str(name) == STAND_IN else load(cls, name, *args, **kwargs)

    CLIPTokenizer.from_pretrained = classmethod(from_pretrained)
    if os.environ.get("AGENTSD_PATCH") == "1":
        from diffusers import DiffusionPipeline, UNet2DConditionModel

        import agentsd

        settings = json.loads(os.environ.get("AGENTSD_SETTINGS", '{"agent_fraction": 1.0}'))
        register = DiffusionPipeline.register_modules

        def register_modules(self, **modules):
            register(self, **modules)
            if isinstance(modules.get("unet"), UNet2DConditionModel):
                agentsd.apply_patch(modules["unet"], **settings)

        DiffusionPipeline.register_modules = register_modules

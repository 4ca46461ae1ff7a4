"""agentsd: training-free agent attention with token merging (AgentSD) for diffusers.

    import agentsd
    agentsd.apply_patch(pipe, ratio=0.4)   # AgentSD on
    agentsd.remove_patch(pipe)             # exactly the original pipeline again

``agentsd.REFERENCE_MODEL`` is the folder of the small text-to-image pipeline shipped with the
package (``StableDiffusionPipeline.from_pretrained(agentsd.REFERENCE_MODEL)``, offline).
"""
from pathlib import Path

from .agent_attention import agent_attention
from .config import AgentSDConfig, Phase, load_config, save_config
from .patch import (
    apply_patch,
    is_patched,
    patch_config,
    patched,
    remove_patch,
    self_attention_layers,
    store_config,
    stored_config,
)

__version__ = "0.1.0"
#: The embedded reference model (a diffusers pipeline folder) and its attribute classifier.
REFERENCE_MODEL = Path(__file__).resolve().parent / "reference_model"

__all__ = [
    "REFERENCE_MODEL",
    "AgentSDConfig",
    "Phase",
    "agent_attention",
    "apply_patch",
    "is_patched",
    "load_config",
    "patch_config",
    "patched",
    "remove_patch",
    "save_config",
    "self_attention_layers",
    "store_config",
    "stored_config",
]

"""agentsd: training-free agent attention with token merging (AgentSD) for diffusers.

    import agentsd
    agentsd.apply_patch(pipe, ratio=0.4)   # AgentSD on
    agentsd.remove_patch(pipe)             # exactly the original pipeline again
"""
from .agent_attention import agent_attention
from .config import AgentSDConfig, Phase, load_config, save_config
from .models import self_attention_layers
from .patch import (
    apply_patch,
    is_patched,
    patch_config,
    patched,
    remove_patch,
    resolve_config,
    store_config,
    stored_config,
)
from .phase import timestep_value
from .tuning import TuneResult, tune

__version__ = "0.3.0"

__all__ = [
    "AgentSDConfig",
    "Phase",
    "TuneResult",
    "agent_attention",
    "apply_patch",
    "is_patched",
    "load_config",
    "patch_config",
    "patched",
    "remove_patch",
    "resolve_config",
    "save_config",
    "self_attention_layers",
    "store_config",
    "stored_config",
    "timestep_value",
    "tune",
]

"""AgentSD beside the rest of diffusers: processors set before and after patching (never replaced),
fused projections, the processors' keywords, module processors, copies of every kind, logging,
and the timestep read on the host."""
import copy
import io
import logging
import pickle

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from torch._dynamo.utils import counters
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import agentsd
import tiny
from agentsd import phase

TOP = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
TOP_KEY = TOP + ".processor"


def run(pipe, seed=0, **kwargs):
    return pipe("a red circle", generator=torch.Generator().manual_seed(seed), num_inference_steps=4,
                height=64, width=64, output_type="np", **kwargs).images


def far(a, b):
    return np.abs(a - b).max() > 1e-3


def close(a, b):
    return np.abs(a - b).max() < 1e-5


@pytest.fixture
def pipe():
    return tiny.sd_pipeline()


# ----------------------------------------------------------------------------- processors set later
@pytest.mark.parametrize("change", [
    lambda p: p.enable_attention_slicing(),
    lambda p: p.unet.set_attn_processor(AttnProcessor()),
    lambda p: p.unet.set_default_attn_processor(),
    lambda p: p.fuse_qkv_projections(),
])
def test_a_processor_set_while_patched_is_the_one_used_and_shown(pipe, change):
    reference = tiny.sd_pipeline()
    change(reference)
    plain_with_change = run(reference)
    agentsd.apply_patch(pipe, ratio=0.5)
    patched = run(pipe)
    change(pipe)
    assert agentsd.is_patched(pipe)
    user_set = {name: type(p) for name, p in reference.unet.attn_processors.items()}
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == user_set  # exactly what was set
    after = run(pipe)
    assert close(after, patched) and far(after, plain_with_change)  # the patch works through it
    agentsd.remove_patch(pipe)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == user_set
    assert np.array_equal(run(pipe), plain_with_change)


def test_fused_projections_before_and_after_patching_use_one_matmul(pipe):
    agentsd.apply_patch(pipe, ratio=0.5)
    unfused = run(pipe)
    agentsd.remove_patch(pipe)
    pipe.fuse_qkv_projections()
    agentsd.apply_patch(pipe, ratio=0.5)
    attn = pipe.unet.get_submodule(TOP)
    calls = {"to_q": 0, "to_qkv": 0}
    for name in calls:
        getattr(attn, name).register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    fused = run(pipe)
    assert close(fused, unfused)
    assert calls["to_q"] == 0 and calls["to_qkv"] > 0  # tokens and agents through to_qkv
    pipe.unfuse_qkv_projections()
    assert close(run(pipe), unfused) and type(attn.processor) is AttnProcessor2_0
    agentsd.remove_patch(pipe)


class ModuleProcessor(torch.nn.Module):
    """A processor with weights of its own: a learned gain on the output of plain attention."""

    def __init__(self, dim):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.full((dim,), 1.5))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask) * self.gain


def test_a_module_processor_keeps_its_weights_in_the_model(pipe, caplog):
    attn = pipe.unet.get_submodule(TOP)
    attn.set_processor(ModuleProcessor(attn.to_out[0].out_features))
    keys = set(pipe.unet.state_dict())
    plain = run(pipe)
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        agentsd.apply_patch(pipe, ratio=0.5, agent_fraction=1.0)
        patched = run(pipe)
        run(pipe)
    assert set(pipe.unet.state_dict()) == keys and f"{TOP_KEY}.gain" in keys  # still a registered submodule
    assert far(patched, plain)
    # agent attention cannot reproduce its math: it runs on the merged tokens, ToMe style, logged once
    assert caplog.text.count("cannot reproduce the processor ModuleProcessor") == 1
    pipe.unet.to(torch.float64)
    assert attn.processor.gain.dtype == torch.float64  # .to() reaches it
    agentsd.remove_patch(pipe)
    assert isinstance(attn.processor, ModuleProcessor) and attn.processor.gain.dtype == torch.float64


class KeywordProcessor(AttnProcessor2_0):
    """A user's processor with its own keyword; ``seen`` records it (eager runs only: a list that
    grows would make dynamo recompile)."""

    def __init__(self, record=True):
        self.seen = [] if record else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 my_scale=1.0):
        if self.seen is not None:
            self.seen.append(my_scale)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * my_scale


def keyword_pipeline(record):
    pipe = tiny.sd_pipeline()
    pipe.unet.set_attn_processor(KeywordProcessor(record))  # every layer takes the keyword
    agentsd.apply_patch(pipe, ratio=0.5, merge_crossattn=True, agent_fraction=0.5)
    return pipe


def test_keywords_reach_the_processors_without_warning(caplog):
    pipe = keyword_pipeline(record=True)
    top, cross = pipe.unet.get_submodule(TOP), pipe.unet.get_submodule(TOP.replace("attn1", "attn2"))
    with caplog.at_level(logging.WARNING):
        half = run(pipe, cross_attention_kwargs={"my_scale": 0.5})
    assert "not expected" not in caplog.text
    assert set(cross.processor.seen) == {0.5}  # attn2's processor, on the merged tokens
    # attn1's processor, a subclass AgentSD does not reproduce: it runs on the merged tokens (ToMe)
    assert set(top.processor.seen) == {0.5} and "cannot reproduce the processor KeywordProcessor" in caplog.text
    assert far(half, run(pipe, cross_attention_kwargs={"my_scale": 1.0}))
    agentsd.remove_patch(pipe)
    assert isinstance(top.processor, KeywordProcessor) and isinstance(cross.processor, KeywordProcessor)


def test_keywords_under_regional_compile_without_graph_breaks(fresh_dynamo):
    eager = run(keyword_pipeline(record=False), cross_attention_kwargs={"my_scale": 0.5})
    pipe = keyword_pipeline(record=False)
    pipe.unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    compiled = run(pipe, cross_attention_kwargs={"my_scale": 0.5})
    assert close(compiled, eager) and sum(counters["graph_break"].values()) == 0


# ----------------------------------------------------------------------------- copies
def pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def torch_saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [copy.deepcopy, pickled, torch_saved])
@pytest.mark.parametrize("options", [dict(ratio=0.5), dict(merge_crossattn=True, merge_mlp=True)])
def test_copies_of_a_patched_pipeline_are_independent(pipe, copier, options):
    plain = run(pipe)
    agentsd.apply_patch(pipe, **options)
    patched = run(pipe)
    twin = copier(pipe)
    assert agentsd.is_patched(twin) and np.array_equal(run(twin), patched)
    twin.scheduler = DDIMScheduler.from_config(twin.scheduler.config)
    phases = tiny.record_phases(twin)
    run(twin)
    assert phases == ["agent", "late", "late", "late"]  # DDIM's 4 steps: 751 (>= 600), 501, 251, 1
    with torch.no_grad():  # the copy computes with its own weights, and the original with its own
        for param in twin.unet.parameters():
            param.mul_(0.5)
    assert far(run(twin), patched) and np.array_equal(run(pipe), patched)
    agentsd.remove_patch(twin)
    assert agentsd.is_patched(pipe) and np.array_equal(run(pipe), patched)
    agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe), plain)


@pytest.mark.parametrize("copier", [copy.deepcopy, pickled, torch_saved])
def test_a_unet_copied_alone_follows_the_timestep(copier):
    unet = tiny.unet("sd1")
    agentsd.apply_patch(tiny.sd_pipeline().__class__(**{**tiny.sd_pipeline().components, "unet": unet}))
    twin = copier(unet)
    phases = tiny.record_phases(twin)
    with torch.no_grad():
        for t in (999, 601, 599):
            twin(torch.randn(1, 4, 16, 16), torch.tensor([t]), torch.randn(1, 77, 32))
    assert phases == ["agent", "agent", "late"]


# ----------------------------------------------------------------------------- logging
@pytest.mark.parametrize("reduction", ["merge", "pool"])
def test_apply_logs_what_it_patched_and_warns_once_per_patch_for_a_fallback(pipe, caplog, reduction):
    with caplog.at_level(logging.INFO, logger="agentsd"):
        # a 16x16 grid: smaller than one 32x32 cell, for either reduction
        agentsd.apply_patch(pipe, sx=32, sy=32, agent_fraction=1.0, reduction=reduction)
    assert "AgentSD on 3 UNet2DConditionModel blocks at downsampling [1] (down_blocks.0.attentions.0" in caplog.text
    assert "given: sx=32, sy=32, agent_fraction=1.0" in caplog.text and "default: ratio=None" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        run(pipe)
        run(pipe)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # once per block, not per call
    assert all("token grid is smaller than one 32x32 cell; it keeps every token" in r.getMessage() for r in warnings)
    assert not logging.getLogger("agentsd").handlers  # a library adds no handler
    with caplog.at_level(logging.DEBUG, logger="agentsd"):
        run(pipe)
    assert sum("call at t=" in r.getMessage() for r in caplog.records) == len(pipe.scheduler.timesteps)


def test_stored_settings_are_logged_with_their_source_and_unknown_keys_ignored(pipe, caplog):
    agentsd.store_config(pipe, agentsd.AgentSDConfig(sx=2, sy=2))
    pipe.unet.register_to_config(_agentsd_config={**pipe.unet.config["_agentsd_config"], "from_the_future": 1})
    del pipe.unet.config["_agentsd_config"]["k_shortcut"]  # a setting it did not store
    with caplog.at_level(logging.INFO, logger="agentsd"):
        agentsd.apply_patch(pipe, ratio=0.3)
    assert "ignoring unknown AgentSD setting(s) ['from_the_future']" in caplog.text
    assert "given: ratio=0.3" in caplog.text and "stored with the model: agent_ratio=0.95, sx=2, sy=2" in caplog.text
    assert "default: k_shortcut=0.075" in caplog.text
    assert agentsd.patch_config(pipe) == agentsd.AgentSDConfig(ratio=0.3, sx=2, sy=2)


def test_a_custom_processor_under_the_patch_is_named_in_a_warning(pipe, caplog):
    class Custom:
        def __call__(self, attn, hidden_states, **kwargs):
            return AttnProcessor2_0()(attn, hidden_states, **kwargs)

    pipe.unet.get_submodule(TOP).set_processor(Custom())
    agentsd.apply_patch(pipe)
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        run(pipe)
    assert f"{TOP}: agent attention cannot reproduce the processor Custom" in caplog.text


# ----------------------------------------------------------------------------- the timestep on the host
class Recording(torch.Tensor):
    """A tensor that records the torch functions called on it."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_timestep_from_a_schedule_is_read_from_its_host_copy():
    """What a device timestep goes through: the schedule copied once, then no read per call."""
    schedule = torch.tensor([999.0, 750.0, 500.0, 250.0]).as_subclass(Recording)
    assert phase._from_host_copy(schedule[0]) == 999.0  # the first call copies the schedule once
    Recording.calls.clear()
    got = [phase._from_host_copy(schedule[i]) for i in range(1, 4)] + [phase._from_host_copy(schedule[2].expand(2))]
    assert got == [750.0, 500.0, 250.0, 500.0]
    reads = {"item", "__float__", "tolist", "cpu", "to", "numpy", "__bool__", "min", "max"}
    assert not reads & set(Recording.calls), Recording.calls
    schedule.mul_(0.5)  # changed in place: copied again
    assert phase._from_host_copy(schedule[1]) == 375.0
    assert phase._from_host_copy(torch.tensor([1.0, 2.0])) is None  # not one element: read directly


@pytest.mark.parametrize("timestep,value", [
    (torch.tensor(999), 999.0), (torch.tensor([981.0, 981.0]), 981.0), (torch.tensor([900, 300]), 300.0),
    (500, 500.0), (250.5, 250.5),
])
def test_timestep_value_is_the_smallest_of_the_batch(timestep, value):
    assert agentsd.timestep_value(timestep) == value

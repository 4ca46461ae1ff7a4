"""AgentSD beside the rest of diffusers: processors set after patching, fused projections, the
wrapped processor's keywords, copies of every kind, logging, and the host-side step position."""
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
from agentsd.processor import AgentSDAttnProcessor
from agentsd.schedule import StepTracker

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
    lambda p: p.fuse_qkv_projections(),
])
def test_a_processor_set_after_patching_becomes_the_base(pipe, change):
    reference = tiny.sd_pipeline()
    change(reference)
    plain_with_change = run(reference)
    agentsd.apply_patch(pipe, ratio=0.5)
    patched = run(pipe)
    change(pipe)
    assert agentsd.is_patched(pipe)
    after = run(pipe)
    assert close(after, patched) and far(after, plain_with_change)
    assert isinstance(pipe.unet.attn_processors[TOP_KEY], AgentSDAttnProcessor)
    user_set = type(pipe.unet.attn_processors[TOP_KEY].base)
    agentsd.remove_patch(pipe)
    assert type(pipe.unet.attn_processors[TOP_KEY]) is user_set  # the processor the user set last
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
    assert close(run(pipe), unfused) and isinstance(attn.processor.base, AttnProcessor2_0)
    agentsd.remove_patch(pipe)
    assert all(not isinstance(p, AgentSDAttnProcessor) for p in pipe.unet.original_attn_processors.values())


def test_set_default_attn_processor_says_what_to_do_and_loses_nothing(pipe):
    agentsd.apply_patch(pipe, ratio=0.5)
    patched = run(pipe)
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="agentsd.remove_patch"):
        pipe.unet.set_default_attn_processor()
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert np.array_equal(run(pipe), patched)
    agentsd.remove_patch(pipe)
    pipe.unet.set_default_attn_processor()  # works once the patch is off


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
    # the late phase keeps every token (tome_ratio 0), so attn1's own processor runs there
    agentsd.apply_patch(pipe, ratio=0.5, merge_crossattn=True, agent_fraction=0.5, tome_ratio=0.0)
    return pipe


def test_keywords_reach_the_wrapped_processors_without_warning(caplog):
    pipe = keyword_pipeline(record=True)
    top, cross = pipe.unet.get_submodule(TOP), pipe.unet.get_submodule(TOP.replace("attn1", "attn2"))
    with caplog.at_level(logging.WARNING):
        half = run(pipe, cross_attention_kwargs={"my_scale": 0.5})
    assert "not expected" not in caplog.text
    assert set(cross.processor.base.seen) == {0.5}  # attn2's processor, on the merged tokens
    assert set(top.processor.base.seen) == {0.5}  # attn1's processor, in the steps AgentSD keeps every token
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
def test_copies_of_a_patched_pipeline_are_independent(pipe, copier):
    agentsd.apply_patch(pipe, ratio=0.5)
    patched = run(pipe)
    twin = copier(pipe)
    assert agentsd.is_patched(twin) and np.array_equal(run(twin), patched)
    twin.scheduler = DDIMScheduler.from_config(twin.scheduler.config)  # the copy follows its own scheduler
    phases = []
    twin.unet.register_forward_hook(lambda m, a, o: phases.append(m._agentsd_state.phase.agent_ratio is not None))
    run(twin)
    assert phases == [True, True, False, False]  # 40 % of DDIM's 4 steps
    agentsd.remove_patch(twin)
    assert agentsd.is_patched(pipe) and np.array_equal(run(pipe), patched)


@pytest.mark.parametrize("copier", [copy.deepcopy, pickled, torch_saved])
def test_a_unet_copied_alone_follows_the_timestep(copier):
    unet = tiny.unet("sd1")
    agentsd.apply_patch(tiny.sd_pipeline().__class__(**{**tiny.sd_pipeline().components, "unet": unet}))
    twin = copier(unet)
    phases = []
    twin.register_forward_hook(lambda m, a, o: phases.append(m._agentsd_state.phase.agent_ratio is not None))
    with torch.no_grad():
        for t in (999, 601, 599):
            twin(torch.randn(1, 4, 16, 16), torch.tensor([t]), torch.randn(1, 77, 32))
    assert phases == [True, True, False] and twin._agentsd_state.pipeline is None


# ----------------------------------------------------------------------------- logging
def test_apply_logs_what_it_patched_and_warns_once_per_patch_for_a_fallback(pipe, caplog):
    with caplog.at_level(logging.INFO, logger="agentsd"):
        agentsd.apply_patch(pipe, sx=32, sy=32, agent_fraction=1.0)  # 16x16 grid: smaller than one cell
    assert "AgentSD on 3 transformer blocks at downsampling [1]" in caplog.text and "sx=32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        run(pipe)
        run(pipe)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # once per block, not per call
    assert all("smaller than one 32x32 cell" in r.getMessage() for r in warnings)
    assert not logging.getLogger("agentsd").handlers  # a library adds no handler
    with caplog.at_level(logging.DEBUG, logger="agentsd"):
        run(pipe)
    assert sum("UNet call at t=" in r.getMessage() for r in caplog.records) == len(pipe.scheduler.timesteps)


def test_a_custom_processor_under_the_patch_is_named_in_a_warning(pipe, caplog):
    class Custom:
        def __call__(self, attn, hidden_states, **kwargs):
            return AttnProcessor2_0()(attn, hidden_states, **kwargs)

    pipe.unet.get_submodule(TOP).set_processor(Custom())
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        agentsd.apply_patch(pipe)
    assert "Custom is not one of diffusers' standard attention processors" in caplog.text


# ----------------------------------------------------------------------------- step position
class Recording(torch.Tensor):
    """A tensor that records the torch functions called on it."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_step_position_reads_no_timestep_value_from_the_device():
    schedule = torch.tensor([999.0, 750.0, 750.0, 500.0, 250.0]).as_subclass(Recording)
    scheduler = type("S", (), {"timesteps": schedule, "config": None})()
    tracker = StepTracker()
    tracker.progress(schedule[0], scheduler)  # the first call of a run copies the schedule once
    Recording.calls.clear()
    got = [tracker.progress(schedule[i], scheduler) for i in range(1, 5)]
    assert got == [(0.2, 750.0), (0.2, 750.0), (0.6, 500.0), (0.8, 250.0)]  # a repeat counts at its first place
    reads = {"item", "__float__", "tolist", "cpu", "to", "numpy", "__bool__", "__eq__", "sub", "abs"}
    assert not reads & set(Recording.calls), Recording.calls

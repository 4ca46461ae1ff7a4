"""AgentSD stacked with DeepCache (PyPI ``deepcache``): either order, exact removal, phases."""
import numpy as np
import pytest
import torch

import agentsd
from agentsd import context
import tiny

DeepCache = pytest.importorskip("DeepCache")


def run(pipe, steps=6):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                height=64, width=64, output_type="np").images


def deepcache(pipe):
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    return helper


@pytest.mark.parametrize("agentsd_first", [False, True])
def test_stacks_in_either_order_and_each_removes_alone(agentsd_first):
    pipe = tiny.sd_pipeline()
    reference = run(pipe)
    helper = deepcache(pipe)
    with agentsd.patched(pipe):
        agent_only = run(pipe)
    helper.enable()
    cache_only = run(pipe)
    helper.disable()

    if agentsd_first:
        agentsd.apply_patch(pipe)
        helper.enable()
    else:
        helper.enable()
        agentsd.apply_patch(pipe)
    both = run(pipe)
    assert not np.array_equal(both, cache_only) and not np.array_equal(both, agent_only)
    if agentsd_first:  # take them off in the order they came on, so each is removed while the other is on
        agentsd.remove_patch(pipe)
        assert np.array_equal(run(pipe), cache_only)
        helper.disable()
    else:
        helper.disable()
        assert np.array_equal(run(pipe), agent_only)
        agentsd.remove_patch(pipe)
    assert np.array_equal(run(pipe), reference)


def test_phases_are_the_same_on_cached_and_full_steps():
    pipe = tiny.sd_pipeline()
    agentsd.apply_patch(pipe, agent_fraction=0.4)
    attn1 = pipe.unet.up_blocks[-1].attentions[-1].transformer_blocks[0].attn1  # runs on every step

    def record():
        calls = []
        # after agentsd's own pre-hook, which picks the phase
        unet_hook = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append([context.current().phase]))
        attn_hook = attn1.register_forward_pre_hook(  # the block's reductions, on the stack
            lambda m, a: calls[-1].append(type(context.current()) is context.BlockCall)
        )
        return calls, (unet_hook, attn_hook)

    plain_calls, hooks = record()
    run(pipe, steps=10)
    for h in hooks:
        h.remove()
    helper = deepcache(pipe)
    helper.enable()
    cached_calls, hooks = record()
    run(pipe, steps=10)
    helper.disable()
    assert [c[0] for c in cached_calls] == [c[0] for c in plain_calls]  # the same phase every call
    assert all(len(c) == 2 and c[1] for c in cached_calls)  # the patched layer merged on every call

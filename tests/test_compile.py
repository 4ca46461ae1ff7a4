"""The patch under torch.compile: regional (compile_repeated_blocks) and whole-UNet.

Most tests trace with the ``aot_eager`` backend: dynamo's graph capture, guards and graph
breaks are exactly those of the default backend, without the minutes of C++ compilation;
one test runs inductor itself.
"""
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import agentsd
import tiny


def run(pipe, steps=4, size=64):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                height=size, width=size, output_type="np").images


def compiled_stats():
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.fixture(autouse=True)
def _fresh(fresh_dynamo):
    yield


@pytest.mark.parametrize("mode", ["regional", "whole"])
def test_compiled_patch_equals_eager_and_compiles_per_phase_not_per_step(mode):
    pipe = tiny.sd_pipeline()
    agentsd.apply_patch(pipe, ratio=0.5)  # agent phase on the first 40 % of the steps, ToMe after
    eager, eager_long = run(pipe), run(pipe, steps=8)
    if mode == "regional":
        pipe.unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    else:
        pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    compiled = run(pipe)
    graphs, breaks = compiled_stats()
    np.testing.assert_allclose(compiled, eager, atol=1e-3)
    assert breaks == 0  # at most the phase selection could break, and it runs outside
    assert 2 <= graphs <= 6  # one graph per phase and block shape, for 5 UNet calls
    np.testing.assert_allclose(run(pipe), eager, atol=1e-3)
    np.testing.assert_allclose(run(pipe, steps=8), eager_long, atol=1e-3)  # more steps, same graphs
    assert compiled_stats() == (graphs, breaks)


def test_patch_applied_and_removed_after_compiling():
    pipe = tiny.sd_pipeline()
    reference = run(pipe)
    with agentsd.patched(pipe, agent_fraction=1.0):
        patched = run(pipe)
    pipe.unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    np.testing.assert_allclose(run(pipe), reference, atol=1e-5)
    agentsd.apply_patch(pipe, agent_fraction=1.0)
    np.testing.assert_allclose(run(pipe), patched, atol=1e-5)
    agentsd.remove_patch(pipe)
    np.testing.assert_allclose(run(pipe), reference, atol=1e-5)


def test_step_values_reach_compiled_blocks_as_tensors():
    """Each step's dst positions differ, with one graph: the key is a tensor, not a constant."""
    unet = tiny.unet("sd1")
    agentsd.apply_patch(unet, agent_fraction=1.0)
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        eager = [unet(sample, t, text).sample for t in (999, 998)]
        unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        compiled = [unet(sample, t, text).sample for t in (999, 998)]
    assert not torch.equal(eager[0], eager[1])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    graphs = compiled_stats()[0]
    with torch.no_grad():
        unet(sample, 997, text)
    assert compiled_stats()[0] == graphs


def test_inductor_regional_fullgraph():
    pipe = tiny.sd_pipeline()
    agentsd.apply_patch(pipe, ratio=0.5, merge_crossattn=True)
    eager = run(pipe, steps=3)
    pipe.unet.compile_repeated_blocks(fullgraph=True)
    np.testing.assert_allclose(run(pipe, steps=3), eager, atol=1e-3)
    assert compiled_stats()[1] == 0

"""ToDo (eval/todo.py) against its definition, its off step, and its exact removal."""
import copy

import pytest
import torch
from diffusers import DDIMScheduler

import agentsd
from eval.todo import ToDoSettings, apply_todo, remove_todo

import tiny


class Reference:
    """ToDo by its definition, written plainly: softmax(Q K^T / sqrt(d)) V per head, with Q from
    every token and K, V from the token grid keeping every ``factor``-th row and column (what
    nearest downsampling by an integer factor keeps)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, c = hidden_states.shape
        side = int(n**0.5)
        grid = hidden_states.reshape(b, side, side, c)[:, :: self.factor, :: self.factor].reshape(b, -1, c)
        q, k, v = attn.to_q(hidden_states), attn.to_k(grid), attn.to_v(grid)
        heads, d = attn.heads, q.shape[-1] // attn.heads
        q, k, v = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
        weights = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) / d**0.5, dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", weights, v).permute(0, 2, 1, 3).reshape(b, n, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def inputs(latent=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, latent, latent, generator=g, dtype=torch.float64), torch.tensor(500),
            torch.randn(2, 77, 32, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("factor", [2, 4])
def test_matches_its_definition_on_the_top_level_only(factor):
    unet = tiny.unet("sd1").double()
    reference = copy.deepcopy(unet)
    top = agentsd.self_attention_layers(unet)
    assert top and all(level == 1 for _, level in top.values())
    for name in top:
        reference.get_submodule(name).set_processor(Reference(factor))
    with torch.no_grad():
        plain = unet(*inputs()).sample
        apply_todo(unet, factor=factor, off_after=1.0)
        todo = unet(*inputs()).sample
        expected = reference(*inputs()).sample
    assert (todo - plain).abs().max() > 1e-3  # the downsampling changes the output
    torch.testing.assert_close(todo, expected, rtol=0, atol=1e-10)


def test_fused_projections_give_the_same_output():
    unet = tiny.unet("sd1")
    fused = copy.deepcopy(unet)
    fused.fuse_qkv_projections()
    with torch.no_grad():
        outputs = [apply_todo(u, off_after=1.0)(*(t.float() for t in inputs())).sample for u in (unet, fused)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def key_tokens(pipe):
    """The number of keys of the first patched layer at each UNet call."""
    attn1 = next(iter(agentsd.self_attention_layers(pipe.unet).values()))[0]
    calls = []
    attn1.to_k.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    return calls


@pytest.mark.parametrize("off_after, on_steps", [(0.6, 6), (0.8, 8), (1.0, 10)])
def test_turns_off_after_its_share_of_the_steps(off_after, on_steps):
    pipe = tiny.sd_pipeline(scheduler=DDIMScheduler())  # one UNet call per step (PNDM repeats one)
    apply_todo(pipe, off_after=off_after)
    calls = key_tokens(pipe)
    pipe("a red circle", num_inference_steps=10, height=64, width=64, generator=torch.Generator().manual_seed(0),
         output_type="np")
    assert calls == [64] * on_steps + [256] * (10 - on_steps)  # 16x16 grid -> 8x8 keys while on


def test_removal_restores_the_model_bit_for_bit():
    pipe = tiny.sd_pipeline()
    processors = dict(pipe.unet.attn_processors)
    hooks = dict(pipe.unet._forward_pre_hooks)

    def run():
        return pipe("a red circle", num_inference_steps=4, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    before = run()
    apply_todo(pipe, factor=2, mode="bilinear")
    apply_todo(pipe)  # a second patch replaces the first
    assert not (run() == before).all()
    remove_todo(pipe)
    remove_todo(pipe)  # removing twice does nothing
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert dict(pipe.unet._forward_pre_hooks) == hooks and "_todo_patch" not in vars(pipe.unet)
    assert (run() == before).all()


def test_settings_are_checked():
    for bad in (dict(factor=0.5), dict(mode="linear"), dict(off_after=0), dict(off_after=1.5), dict(max_downsample=3)):
        with pytest.raises(ValueError, match="ToDo"):
            ToDoSettings(**bad)
    assert ToDoSettings().to_dict() == {"factor": 2.0, "mode": "nearest", "off_after": 0.8, "max_downsample": None}


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_todo_on_transformers_equals_agentsds_pooled_late_phase(family):
    """ToDo's nearest downsampling by 2 keeps the top-left token of every 2x2 cell: on a transformer
    (SD3's joint attention keeping every text token) it is AgentSD's pooled late phase with
    ``pool_mode="nearest"`` and ``tome_ratio=0.75``, held to its own plain reference in test_dit.py."""
    build = tiny.pixart_transformer if family == "pixart" else tiny.sd3_transformer
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    text = torch.randn(2, 8, 32, generator=g, dtype=torch.float64)
    extra = ({"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}} if family == "pixart"
             else {"pooled_projections": torch.randn(2, 64, generator=g, dtype=torch.float64)})

    def out(model):
        with torch.no_grad():
            return model(sample, encoder_hidden_states=text, timestep=torch.full((2,), 500.0, dtype=torch.float64),
                         **extra).sample

    model = build().double()
    plain = out(model)
    apply_todo(model, ToDoSettings(off_after=1.0))
    todo = out(model)
    remove_todo(model)
    assert torch.equal(out(model), plain)
    agentsd.apply_patch(model, reduction="pool", agent_fraction=0.0, tome_ratio=0.75, pool_mode="nearest")
    torch.testing.assert_close(todo, out(model), rtol=0, atol=1e-10)
    assert (todo - plain).abs().max() > 1e-3

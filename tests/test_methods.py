"""The method registry: every method switches on and off a pipeline and a bare UNet, bit for bit;
AgentSD methods apply their phase; agentsd-pool is wired like agentsd."""
import pytest
import torch

import agentsd
from eval.methods import SPECS, Options, build_methods, table_order

import tiny

EVERY = [*SPECS, "deepcache", "tomesd+deepcache", "todo+deepcache", "agentsd+deepcache", "agentsd-pool+deepcache",
         "bound+deepcache"]


def unet_output(unet):
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor(981), e).sample


def images(pipe):
    return pipe("a red circle", num_inference_steps=4, height=64, width=64, generator=torch.Generator().manual_seed(0),
                output_type="np").images


@pytest.mark.parametrize("phase", ["agent", "late"])
def test_every_method_switches_on_and_off_a_bare_unet(phase):
    unet = tiny.unet("sd1")
    plain = unet_output(unet)
    processors, forwards = dict(unet.attn_processors), {n: m.forward for n, m in unet.named_modules()}
    for m in build_methods(EVERY, [0.4], Options(phase=phase)):
        m.apply(unet)
        changed = unet_output(unet)
        m.remove(unet)
        if m.name not in ("sd", "deepcache"):  # one call at t=981: DeepCache's first call is a full one
            assert not torch.equal(changed, plain), m.key
        assert torch.equal(unet_output(unet), plain), m.key
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert {n: m.forward for n, m in unet.named_modules()} == forwards and not agentsd.is_patched(unet)


def test_every_method_switches_on_and_off_a_pipeline():
    pipe = tiny.sd_pipeline()
    plain = images(pipe)
    for m in table_order(build_methods(EVERY, [0.4])):
        m.apply(pipe)
        changed = images(pipe)
        m.remove(pipe)
        assert (changed != plain).any() or m.name == "sd", m.key
        assert (images(pipe) == plain).all(), m.key


@pytest.mark.parametrize("name", ["agentsd", "agentsd-pool"])
def test_agentsd_methods_apply_their_phase_and_ratio(name, monkeypatch):
    calls = []
    monkeypatch.setattr(agentsd, "apply_patch", lambda target, **kw: calls.append(kw))
    extra = {"reduction": "pool" if name == "agentsd-pool" else "merge"}
    for phase, fraction in (("agent", 1.0), ("late", 0.0)):
        methods = build_methods([name, f"{name}+deepcache"], [0.2, 0.4], Options(phase=phase))
        assert [m.key for m in methods] == [f"{name}@0.2:{phase}", f"{name}@0.4:{phase}",
                                            f"{name}+deepcache@0.2:{phase}", f"{name}+deepcache@0.4:{phase}"]
        assert [m.bound for m in methods] == ["bound", "bound", "bound+deepcache", "bound+deepcache"]
        calls.clear()
        methods[1].apply(tiny.unet("sd1"))
        assert calls[0]["ratio"] == 0.4 and calls[0]["agent_fraction"] == fraction
        assert {k: calls[0][k] for k in extra} == extra
        assert methods[1].settings() == {"ratio": 0.4, **extra, "agent_fraction": fraction}
    schedule = build_methods([name], [0.4])[0]  # the FID harness: the library's default schedule
    calls.clear()
    schedule.apply(tiny.unet("sd1"))
    assert "agent_fraction" not in calls[0] and schedule.settings()["agent_fraction"] == 0.4


def test_pooled_agentsd_differs_from_merged_agentsd_and_from_sd():
    unet = tiny.unet("sd1")
    outputs = {}
    for m in build_methods(["sd", "agentsd", "agentsd-pool"], [0.4], Options(phase="agent")):
        m.apply(unet)
        outputs[m.name] = unet_output(unet)
        if m.name == "agentsd-pool":
            assert agentsd.patch_config(unet).reduction == "pool"
        m.remove(unet)
    assert not torch.equal(outputs["agentsd-pool"], outputs["sd"])
    assert not torch.equal(outputs["agentsd-pool"], outputs["agentsd"])


def test_a_row_can_pin_its_own_ratio():
    keys = [m.key for m in build_methods(["sd", "agentsd", "agentsd-pool@0.75", "agentsd-pool+deepcache@0.75:late"],
                                         [0.4])]
    assert keys == ["sd", "agentsd@0.4", "agentsd-pool@0.75", "agentsd-pool+deepcache@0.75:late"]
    assert [m.key for m in build_methods(["agentsd-pool@0.75"], [])] == ["agentsd-pool@0.75"]
    with pytest.raises(ValueError, match="only methods with a ratio take @ratio"):
        build_methods(["sd@0.3"], [0.4])
    with pytest.raises(ValueError, match="must be a number"):
        build_methods(["agentsd@x"], [0.4])

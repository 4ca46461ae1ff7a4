"""The PyPI peers T-GATE and CA-ToMe (eval/peers.py, eval/ca_tome_step.py): each changes the images
and comes off bit for bit, CA-ToMe's step shim gives its own loop's images, the stacks that do not
compose are refused by name, and a peer that does not run here is a row with its reason."""
import importlib.util
import inspect
import json
import re
import sys

import numpy as np
import pytest
import torch

import agentsd
from eval.latency import run_benchmark, sample_timesteps
from eval.methods import Options, build_methods, pndm_schedule, per_step
from eval.peers import CA_TOME_CONFIGS, TGATE_DEFAULTS, CAToMeSettings, TGateSettings
from eval.report import latency_rows, latency_table

import tiny

PROMPTS = ["a red circle", "a blue square"]


def images(call, steps=4):
    torch.manual_seed(0)  # CA-ToMe forks its random dst from the global generator, as tomesd
    return call(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=3.0, height=64, width=64,
                generator=[torch.Generator().manual_seed(s) for s in range(len(PROMPTS))], output_type="np").images


def instance_attributes(pipe):
    return {"pipe": set(vars(pipe)), **{name: set(vars(m)) for name, m in pipe.unet.named_modules()}}


def run_fid(*args):
    from scripts.benchmark_fid import main

    main([*args, "--no-progress"])


@pytest.fixture(scope="module")
def pipe():
    return tiny.sd_pipeline()


@pytest.fixture(scope="module")
def plain(pipe):
    return images(pipe)


def test_tgate_changes_the_images_and_comes_off_bit_for_bit(pipe, plain):
    pytest.importorskip("tgate")
    before = instance_attributes(pipe)
    for name in ("tgate", "tgate+deepcache"):
        (m,) = build_methods([name], [], Options(tgate=TGateSettings(gate_step=2)))
        m.apply(pipe)
        assert m.call(pipe).keywords == {"gate_step": 2, **TGATE_DEFAULTS[m.deepcache is not None], "fi_interval": 1}
        gated = images(m.call(pipe))
        m.remove(pipe)
        assert np.abs(gated - plain).max() > 1e-4, name
        assert np.array_equal(images(pipe), plain), name
        assert instance_attributes(pipe) == before, name
    # T-GATE's own loop is diffusers' loop until it gates: with the gate past the last step and no
    # self-attention cached yet (2 steps < warm_up), its images are sd's, bit for bit
    (m,) = build_methods(["tgate"], [], Options(tgate=TGateSettings(gate_step=10)))
    m.apply(pipe)
    assert np.array_equal(images(m.call(pipe), steps=2), images(pipe, steps=2))
    m.remove(pipe)


def test_tgate_alone_leaves_a_pipeline_that_plain_calls_break_which_removal_repairs(pipe, plain):
    pytest.importorskip("tgate")
    (m,) = build_methods(["tgate"], [], Options(tgate=TGateSettings(gate_step=2)))
    m.apply(pipe)
    images(m.call(pipe))
    with pytest.raises(RuntimeError):  # its cached cross-attention has half the batch
        images(pipe)
    m.remove(pipe)
    assert np.array_equal(images(pipe), plain) and not hasattr(pipe, "tgate")


def test_ca_tome_through_the_step_shim_gives_its_own_loops_images_and_comes_off(pipe, plain):
    pytest.importorskip("ca_tome")
    before = instance_attributes(pipe)
    (m,) = build_methods(["ca-tome"], [])
    m.apply(pipe)
    assert m.call(pipe) is pipe  # it runs in diffusers' own loop
    shimmed, own = images(pipe), images(pipe.call)  # pipe.call: CA-ToMe's copy of the loop, i + 1 passed
    m.remove(pipe)
    assert np.array_equal(shimmed, own)
    assert np.abs(shimmed - plain).max() > 1e-4
    assert np.array_equal(images(pipe), plain) and instance_attributes(pipe) == before
    assert type(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]).__name__ == "BasicTransformerBlock"


def test_ca_tome_on_a_bare_unet_numbers_the_steps_of_sds_schedule():
    pytest.importorskip("ca_tome")
    unet = tiny.unet("sd1")
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        plain = unet(x, torch.tensor(521), e).sample
        (m,) = build_methods(["ca-tome"], [])
        m.apply(unet)
        assert unet.forward.step(torch.tensor(521)) == 25  # pndm_schedule().timesteps[24], a CONFIG_3 checkpoint
        merged = unet(x, torch.tensor(521), e).sample
        m.remove(unet)
        assert not torch.equal(merged, plain) and torch.equal(unet(x, torch.tensor(521), e).sample, plain)
    # a latency sample is one cache cycle: the match at step 25, reused at steps 26-29
    assert sample_timesteps(m) == tuple(int(t) for t in pndm_schedule().timesteps[24:29])


def test_the_defaults_are_the_installed_packages():
    tgate = pytest.importorskip("tgate")
    ca_tome = pytest.importorskip("ca_tome")
    for deepcache, module in ((False, tgate.SD), (True, tgate.SD_DeepCache)):
        params = inspect.signature(module.tgate).parameters
        expected = {**TGATE_DEFAULTS[deepcache], "gate_step": 10, "fi_interval": 1}
        assert {k: params[k].default for k in expected} == expected
    assert TGateSettings().resolved(False) == {"gate_step": 10, "sp_interval": 5, "fi_interval": 1, "warm_up": 2}
    assert set(CA_TOME_CONFIGS) == {k for k in vars(ca_tome.CacheConf) if not k.startswith("_")}
    assert inspect.signature(ca_tome.patch.apply_patch).parameters["r"].default == CAToMeSettings().threshold


def test_stacks_that_do_not_compose_are_refused_by_name(pipe):
    pytest.importorskip("tgate")
    # the measurement behind the refusal: under T-GATE, AgentSD's processors are never called
    (m,) = build_methods(["tgate"], [], Options(tgate=TGateSettings(gate_step=2)))
    m.apply(pipe)
    alone = images(m.call(pipe))
    agentsd.apply_patch(pipe, ratio=0.4)
    stacked = images(m.call(pipe))
    agentsd.remove_patch(pipe)
    m.remove(pipe)
    assert np.array_equal(stacked, alone)
    for name, words in (("agentsd+tgate", "agentsd and tgate do not compose: T-GATE replaces the forward"),
                        ("tgate+agentsd-pool", "tgate and agentsd-pool do not compose"),
                        ("agentsd+ca-tome", "agentsd and ca-tome do not compose: both merge the tokens"),
                        ("tomesd+ca-tome+deepcache", "tomesd and ca-tome do not compose"),
                        ("todo+tgate", "todo and tgate do not compose: .* so todo would be silently off")):
        with pytest.raises(ValueError, match=re.escape(f"method '{name}': ") + words):
            build_methods([name], [0.4])


def test_fid_harness_rows_of_the_peers_with_their_settings(model_dir, tmp_path, capsys):
    pytest.importorskip("tgate")
    pytest.importorskip("ca_tome")
    out = tmp_path / "run"
    common = ["--model", str(model_dir), "--num-images", "2", "--steps", "3", "--batch-size", "2", "--size", "32",
              "--out", str(out), "--tgate-gate-step", "2", "--catome-config", "CONFIG_1", "--catome-threshold", "0.8"]
    with pytest.raises(SystemExit, match="agentsd and tgate do not compose"):  # refused before anything runs
        run_fid(*common, "--methods", "sd", "tgate", "ca-tome", "agentsd+tgate", "--ratios", "0.4")
    assert not out.exists()
    run_fid(*common, "--methods", "sd", "tgate", "ca-tome", "tgate+deepcache", "deepcache")
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"sd", "tgate", "ca-tome", "tgate+deepcache", "deepcache", "bound", "bound+deepcache"}
    for name in ("tgate", "ca-tome", "tgate+deepcache"):
        r = rows[name]
        assert r["reason"] is None and r["num_images"] == 2 and r["seconds_per_image"] > 0, r
        assert np.isfinite(r["fid"]) and 10 < r["psnr"] < np.inf, r  # measured, and not sd's images
    assert rows["tgate"]["bound"] is None and rows["tgate+deepcache"]["baseline"] == "deepcache"
    recorded = results["setup"]["methods"]
    assert recorded["tgate"] == {"loader": "TgateSDLoader", "gate_step": 2, "sp_interval": 5, "fi_interval": 1,
                                 "warm_up": 2}
    assert recorded["tgate+deepcache"]["loader"] == "TgateSDDeepCacheLoader"
    assert recorded["tgate+deepcache"]["deepcache"] == recorded["deepcache"]["deepcache"]
    assert recorded["ca-tome"] == {"cache_config": "CONFIG_1", "threshold": 0.8}
    with pytest.raises(SystemExit):
        run_fid(*common, "--methods", "ca-tome", "--catome-threshold", "2")
    assert "--catome-threshold" in capsys.readouterr().err


def test_a_peer_that_does_not_run_here_is_a_row_with_its_reason(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--model", str(model_dir), "--num-images", "2", "--steps", "2", "--batch-size", "2", "--size", "32",
            "--no-bound", "--out", str(out), "--methods", "sd", "tgate", "ca-tome"]
    installed = all(importlib.util.find_spec(p) for p in ("tgate", "ca_tome"))
    changed = "AttributeError: 'UNet2DConditionModel' object has no attribute 'old_name'"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tgate", None)  # as if not installed
        if importlib.util.find_spec("ca_tome"):
            import ca_tome

            def changed_api(*a, **k):
                raise AttributeError(changed.partition(": ")[2] + "\nmore lines")

            m.setattr(ca_tome, "apply_CA_ToMe", changed_api)  # as if its API had changed under diffusers
        run_fid(*args)
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["sd"]["reason"] is None and np.isfinite(rows["sd"]["fid"])
    assert rows["tgate"]["reason"] == "ModuleNotFoundError: import of tgate halted; None in sys.modules"
    assert rows["ca-tome"]["reason"] in (changed, "ModuleNotFoundError: No module named 'ca_tome'")
    assert rows["tgate"]["fid"] is None and rows["ca-tome"]["seconds_per_image"] is None
    assert not (out / "images" / "tgate").exists()
    table = (out / "results.md").read_text()
    assert "| not run because |" in table and "| ModuleNotFoundError: import of tgate halted" in table
    if installed:  # the same command tries them again
        run_fid(*args)
        rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
        assert rows["tgate"]["reason"] is None and rows["ca-tome"]["reason"] is None and rows["tgate"]["fid"]


def test_latency_harness_refuses_tgate_and_times_ca_tome_or_gives_its_reason(tmp_path, monkeypatch, capsys):
    from scripts.benchmark_latency import main

    with pytest.raises(SystemExit, match="tgate wraps the whole pipeline call; it has no per-step row"):
        main(["--sizes", "64", "--methods", "sd", "tgate", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused" / "raw.json").exists()
    unet = tiny.unet("sd1")
    methods = build_methods(["sd", "ca-tome", "bound"], [], per_step(Options(phase="agent")))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ca_tome", None)
        raw = run_benchmark(unet, [64], methods, repeats=1, batch=2, raw_path=tmp_path / "raw.json",
                            progress=lambda s: None)
    rows = {r["method"]: r for r in latency_rows(raw, methods, [64])}
    assert rows["ca-tome"]["median_s"] is None and rows["ca-tome"]["reason"].startswith("ModuleNotFoundError")
    assert "| not run because |" in latency_table(list(rows.values()))
    pytest.importorskip("ca_tome")
    raw = run_benchmark(unet, [64], methods, repeats=1, batch=2, raw_path=tmp_path / "raw.json",
                        progress=lambda s: None)  # the rerun tries it again
    rows = {r["method"]: r for r in latency_rows(raw, methods, [64])}
    assert rows["ca-tome"]["reason"] is None and rows["ca-tome"]["median_s"] > 0 and rows["ca-tome"]["bound"] == "bound"


@pytest.mark.parametrize("make", [tiny.sd_pipeline, tiny.pixart_pipeline], ids=["unet", "pixart"])
def test_pab_alone_and_on_top_of_agentsd_and_removed_exactly(make):
    pipe = make()
    prompt = tiny.pixart_prompt() if make is tiny.pixart_pipeline else {"prompt": "a red circle"}

    def run():
        return pipe(**prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=6, height=64,
                    width=64, output_type="np").images

    plain = run()
    images = {}
    for name in ("pab", "agentsd", "agentsd+pab"):
        m = build_methods([name], [0.4], Options(phase="agent"))[0]
        m.apply(pipe)
        images[name] = run()
        images[name + " again"] = run()  # PAB's state is reset for a new generation
        m.remove(pipe)
        assert np.array_equal(run(), plain), name
    # PAB reuses attention outputs (the tiny PixArt's gated attention moves its images little)
    assert not np.array_equal(images["pab"], plain)
    assert not np.array_equal(images["agentsd+pab"], images["pab"])
    assert not np.array_equal(images["agentsd+pab"], images["agentsd"])
    assert all(np.array_equal(images[n], images[n + " again"]) for n in ("pab", "agentsd+pab"))
    settings = build_methods(["agentsd+pab"], [0.4])[0].settings()
    assert settings["spatial_attention_block_skip_range"] == 2 and settings["agent_fraction"] == 0.4

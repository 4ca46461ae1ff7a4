"""agentsd.tune: the table, the choice and its noise rule, the cache, the model left as it was.

Timings of tiny models say nothing about speed, so the tests check what holds for any timings
(rows for every candidate, the choice is the argmin of the table or None within the noise), and
drive the rule itself with a virtual clock: a forward pre-hook advances it by a cost chosen per
call, and tune reads it instead of ``time.perf_counter``.
"""
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import agentsd
import tiny

from agentsd import tuning as tune_module
ROOT = Path(__file__).resolve().parents[1]
SIZE = dict(height=64, width=64)


def run(pipe, **kwargs):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                output_type="np", **SIZE, **kwargs).images


def module_state(unet):
    return {name: (dict(m.__dict__), dict(m._forward_pre_hooks), dict(m._forward_hooks))
            for name, m in unet.named_modules()}


def count_calls(module):
    """A forward pre-hook counting the denoiser's calls; returns (list of calls, handle)."""
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls, handle


def assert_choice_follows_the_table(result):
    best = min(result.rows, key=lambda row: row.step_seconds)
    none = result.rows[0]
    assert none.settings is None and none.name == "no patch"
    saving = (none.step_seconds - best.step_seconds) / none.step_seconds
    if result.config is None:
        assert best.settings is None or not saving > best.noise
    else:
        assert result.config == best.settings and saving > best.noise


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine spinning threads make each
    call 10-40x slower; the thread count is restored after this file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, one_thread):
    """The tiny SD pipeline tuned once (repeats 3), with images before and after."""
    folder = tmp_path_factory.mktemp("tune_cache")
    pipe = tiny.sd_pipeline()
    before = run(pipe)
    processors = dict(pipe.unet.attn_processors)
    state = module_state(pipe.unet)
    scheduler = (pipe.scheduler, pipe.scheduler.num_inference_steps, pipe.scheduler.timesteps.clone())
    result = agentsd.tune(pipe, **SIZE, repeats=3, warmup=1, cache=folder, progress=False)
    return SimpleNamespace(pipe=pipe, before=before, processors=processors, state=state, scheduler=scheduler,
                           result=result, folder=folder)


# ----------------------------------------------------------------------------- the result


def test_result_has_every_candidate_and_what_was_measured(tuned):
    result = tuned.result
    assert [row.name for row in result.rows] == ["no patch", "merge", "pool"]
    assert [row.settings for row in result.rows] == [None, agentsd.AgentSDConfig(),
                                                     agentsd.AgentSDConfig(reduction="pool")]
    share = 21 / 51  # 50 PNDM steps are 51 calls, 981 (twice) to 601 of them at t >= 600
    for row in result.rows:
        assert len(row.agent_samples) == len(row.late_samples) == 3
        assert row.agent_seconds == sorted(row.agent_samples)[1] and row.late_seconds == sorted(row.late_samples)[1]
        assert row.agent_seconds > 0 and row.late_seconds > 0 and row.spread >= 0
        weight = 0.5 if row.settings is None else share
        assert row.agent_share == (None if row.settings is None else pytest.approx(share))
        assert row.step_seconds == pytest.approx(weight * row.agent_seconds + (1 - weight) * row.late_seconds)
        assert row.speedup == pytest.approx(result.rows[0].step_seconds / row.step_seconds)
        assert row.compile_seconds is None
        assert (row.noise is None) == (row.settings is None)
        if row.noise is not None:
            assert row.noise == pytest.approx(math.hypot(result.rows[0].spread, row.spread))
    assert result.rows[0].speedup == 1.0
    assert result.device.endswith("CPU, 1 thread") and result.dtype == "float32"
    assert (result.height, result.width, result.batch, result.latent) == (64, 64, 2, (16, 16))
    assert result.shape == (64, 64, 2)
    assert result.denoiser == "UNet2DConditionModel" and result.scheduler == "PNDMScheduler"
    assert result.compiled is None and result.compile_seconds is None
    assert (result.num_inference_steps, result.repeats, result.warmup) == (50, 3, 1)
    assert result.versions == {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                               "agentsd": agentsd.__version__}
    assert not result.from_cache
    text = str(result)
    assert text == result.to_markdown()
    assert "| no patch |" in text and "| merge |" in text and "| pool |" in text and "choice:" in text


def test_the_choice_is_the_argmin_of_the_table_or_none_within_the_noise(tuned):
    assert_choice_follows_the_table(tuned.result)
    if tuned.result.config is not None:
        assert tuned.result.best.settings == tuned.result.config


def test_result_round_trips_through_json_and_applies(tuned):
    result = tuned.result
    again = agentsd.TuneResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    unet = tiny.unet("sd1")
    chosen = tune_module.TuneResult.from_dict({**result.to_dict(), "config": result.rows[2].settings.to_dict()})
    assert chosen.apply(unet) is unet and agentsd.patch_config(unet) == agentsd.AgentSDConfig(reduction="pool")
    assert "choice: pool" in chosen.to_markdown()
    nothing = tune_module.TuneResult.from_dict({**result.to_dict(), "config": None})
    nothing.apply(unet)
    assert not agentsd.is_patched(unet)
    with pytest.raises(ValueError, match="not one of the rows"):
        tune_module.TuneResult.from_dict({**result.to_dict(), "config": {"ratio": 0.3}})


# ----------------------------------------------------------------------------- the model as it was


def test_pipeline_left_bit_for_bit_as_it_was(tuned):
    pipe = tuned.pipe
    assert not agentsd.is_patched(pipe)
    assert np.array_equal(run(pipe), tuned.before)
    after = pipe.unet.attn_processors
    assert after.keys() == tuned.processors.keys() and all(after[k] is tuned.processors[k] for k in after)
    state = module_state(pipe.unet)
    assert state.keys() == tuned.state.keys()
    for name, (attrs, pre, post) in tuned.state.items():
        attrs2, pre2, post2 = state[name]
        assert attrs.keys() == attrs2.keys() and all(attrs[k] is attrs2[k] for k in attrs), name
        assert pre == pre2 and post == post2, name
    scheduler, steps, timesteps = tuned.scheduler
    assert pipe.scheduler is scheduler and scheduler.num_inference_steps == steps == 2  # not 50: a copy was used
    assert torch.equal(scheduler.timesteps, timesteps)


def test_a_patched_pipeline_is_patched_again_with_its_settings_and_one_line_is_logged(caplog):
    pipe = tiny.sd_pipeline()
    agentsd.apply_patch(pipe, reduction="pool", ratio=0.5, agent_fraction=0.6)
    settings = agentsd.patch_config(pipe)
    before = run(pipe)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="agentsd"):
        result = agentsd.tune(pipe, **SIZE, repeats=1, warmup=0, cache=False, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert agentsd.patch_config(pipe) == settings
    assert np.array_equal(run(pipe), before)
    lines = [r for r in caplog.records if r.name.startswith("agentsd")]
    assert [(r.name, r.levelno) for r in lines] == [("agentsd.tuning", logging.INFO)]  # no line per apply_patch
    assert "agentsd.tune: UNet2DConditionModel at 64x64 px, batch 2" in lines[0].getMessage()
    assert_choice_follows_the_table(result)


# ----------------------------------------------------------------------------- the cache


def test_second_tune_returns_the_cached_result_without_calling_the_model(tuned):
    calls, handle = count_calls(tuned.pipe.unet)
    try:
        again = agentsd.tune(tuned.pipe, **SIZE, repeats=3, warmup=1, cache=tuned.folder, progress=False)
    finally:
        handle.remove()
    assert calls == [] and again == tuned.result and again.from_cache
    files = list(tuned.folder.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"
    data = json.loads(files[0].read_text())  # JSON, nothing pickled
    assert data["format"] == 1 and data["key"]["height"] == 64 and data["key"]["batch"] == 2
    assert data["key"]["versions"]["agentsd"] == agentsd.__version__
    assert data["key"]["denoiser"].endswith("UNet2DConditionModel")
    assert data["key"]["denoiser_config"]["cross_attention_dim"] == 32
    assert agentsd.TuneResult.from_dict(data["result"]) == tuned.result


def test_cache_false_reads_and_writes_nothing_and_a_corrupt_file_is_rewritten(tmp_path, monkeypatch, caplog):
    default = tmp_path / "default"
    monkeypatch.setenv("AGENTSD_CACHE", str(default))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    unet = tiny.unet("sd1")
    calls, _ = count_calls(unet)
    options = dict(**SIZE, repeats=1, warmup=0, progress=False)

    first = agentsd.tune(unet, **options)  # cache=True: the default folder, $AGENTSD_CACHE
    (file,) = default.iterdir()
    assert len(calls) == 6 and not first.from_cache
    file.write_text("{not json")

    calls.clear()
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        agentsd.tune(unet, **options, cache=False)
    assert len(calls) == 6 and caplog.records == []  # measured again, the corrupt file never read
    assert list(default.iterdir()) == [file] and file.read_text() == "{not json"  # nor written
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()

    calls.clear()
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        third = agentsd.tune(unet, **options)
    assert len(calls) == 6 and "ignoring the unreadable cache file" in caplog.text
    assert json.loads(file.read_text())["result"] == third.to_dict()  # rewritten
    calls.clear()
    assert agentsd.tune(unet, **options) == third and calls == []


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("AGENTSD_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tune_module.cache_folder() == tmp_path / ".cache" / "agentsd" / "tune"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tune_module.cache_folder() == tmp_path / "xdg" / "agentsd" / "tune"
    monkeypatch.setenv("AGENTSD_CACHE", str(tmp_path / "mine"))
    assert tune_module.cache_folder() == tmp_path / "mine"


# ----------------------------------------------------------------------------- inputs


def test_sdxl_gets_its_added_conditions(tmp_path):
    pipe = tiny.sdxl_pipeline()
    calls, handle = count_calls(pipe.unet)
    result = agentsd.tune(pipe, **SIZE, num_images=2, repeats=1, warmup=0, cache=False, progress=False)
    handle.remove()
    assert len(calls) == 6 and result.batch == 4 and result.latent == (16, 16)
    assert result.scheduler == "EulerDiscreteScheduler"
    assert calls[0]["sample"].shape == (4, 4, 16, 16) and calls[0]["timestep"].shape == (4,)
    added = calls[0]["added_cond_kwargs"]
    assert added["text_embeds"].shape == (4, 32) and added["time_ids"].shape == (4, 6)
    assert calls[0]["encoder_hidden_states"].shape == (4, 77, 64)
    assert_choice_follows_the_table(result)


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_transformers_get_their_inputs_and_schedule(family):
    pipe = tiny.pixart_pipeline() if family == "pixart" else tiny.sd3_pipeline()
    calls, handle = count_calls(pipe.transformer)
    result = agentsd.tune(pipe, **SIZE, repeats=1, warmup=0, cache=False, progress=False)
    handle.remove()
    assert len(calls) == 6 and not agentsd.is_patched(pipe)
    assert [row.name for row in result.rows] == ["no patch", "merge", "pool"]
    latents = calls[0]["hidden_states"]
    assert latents.shape == (2, 4, 16, 16) and calls[0]["timestep"].shape == (2,)
    if family == "pixart":
        assert result.denoiser == "PixArtTransformer2DModel" and result.scheduler == "DPMSolverMultistepScheduler"
        assert calls[0]["encoder_hidden_states"].shape == (2, 120, 32)
        assert calls[0]["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    else:
        assert result.denoiser == "SD3Transformer2DModel" and result.scheduler == "FlowMatchEulerDiscreteScheduler"
        assert calls[0]["encoder_hidden_states"].shape == (2, 333, 32)
        assert calls[0]["pooled_projections"].shape == (2, 64)
    assert_choice_follows_the_table(result)
    message = (r"8 \(the vae_scale_factor 4 times the patch size 2\), got 68" if family == "pixart" else
               r"4 \(the vae_scale_factor\), got 66")
    with pytest.raises(ValueError, match="height must be a positive multiple of " + message):
        agentsd.tune(pipe, height=68 if family == "pixart" else 66, width=64, cache=False)


def test_denoiser_inputs_of_bare_unets():
    unet = tiny.unet("sd1")
    assert tune_module.vae_scale_factor(unet) == 8 and tune_module.vae_scale_factor(tiny.sd_pipeline()) == 4
    inputs = tune_module.denoiser_inputs(unet, 3, (8, 12))
    assert inputs["sample"].shape == (3, 4, 8, 12) and inputs["encoder_hidden_states"].shape == (3, 77, 32)
    assert "added_cond_kwargs" not in inputs
    xl = tune_module.denoiser_inputs(tiny.unet("sdxl"), 2, (8, 8), dtype=torch.float64)
    added = xl["added_cond_kwargs"]
    assert added["time_ids"].shape == (2, 6) and added["text_embeds"].shape == (2, 32)
    assert xl["sample"].dtype == torch.float64
    inpaint = tune_module.denoiser_inputs(tiny.unet("sd1", in_channels=9), 2, (8, 8))
    assert inpaint["sample"].shape == (2, 9, 8, 8)
    rng = torch.get_rng_state()
    assert torch.equal(tune_module.denoiser_inputs(unet, 1, (8, 8))["sample"],
                       tune_module.denoiser_inputs(unet, 1, (8, 8))["sample"])
    assert torch.equal(torch.get_rng_state(), rng)


# ----------------------------------------------------------------------------- the rule, on a virtual clock


class VirtualClock:
    """tune's clock: every denoiser call advances it by ``cost(settings, timestep, call number)``."""

    def __init__(self, module, cost):
        self.now, self.calls, self.cost = 0.0, 0, cost
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.now += self.cost(agentsd.patch_config(module), float(kwargs["timestep"].min()), self.calls)
        self.calls += 1

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clocks = []

    def install(module, cost):
        clock = VirtualClock(module, cost)
        monkeypatch.setattr(tune_module, "time", SimpleNamespace(perf_counter=clock.perf_counter))
        clocks.append(clock)
        return clock

    yield install
    for clock in clocks:
        clock.handle.remove()


def test_a_candidate_slowed_on_purpose_gives_none(clock):
    unet = tiny.unet("sd1")
    clock(unet, lambda settings, t, n: 0.1 if settings is None else 0.3)  # every patched call is slower
    result = agentsd.tune(unet, **SIZE, repeats=3, warmup=0, cache=False, progress=False)
    assert result.config is None and result.best.settings is None
    assert [row.speedup for row in result.rows] == pytest.approx([1.0, 1 / 3, 1 / 3])
    assert "choice: no patch" in str(result)
    assert not agentsd.is_patched(unet)


def test_the_fastest_candidate_beyond_the_noise_is_chosen_and_phases_are_weighted(clock):
    unet = tiny.unet("sd1")
    costs = {None: (0.1, 0.1), "merge": (0.06, 0.14), "pool": (0.05, 0.08)}  # (agent, late)
    clock(unet, lambda s, t, n: costs[s and s.reduction][0 if t >= 600 else 1])
    result = agentsd.tune(unet, **SIZE, num_inference_steps=20, repeats=3, warmup=1, cache=False, progress=False)
    share = 9 / 21  # 20 PNDM steps: 21 calls (901 twice), 9 of them at t >= 600
    none, merge, pool = result.rows
    assert pool.step_seconds == pytest.approx(share * 0.05 + (1 - share) * 0.08)
    assert merge.step_seconds == pytest.approx(share * 0.06 + (1 - share) * 0.14)
    assert none.step_seconds == pytest.approx(0.1) and merge.speedup < 1
    assert all(row.spread == pytest.approx(0, abs=1e-12) for row in result.rows)
    assert result.config == agentsd.AgentSDConfig(reduction="pool")
    assert_choice_follows_the_table(result)


def test_a_gain_within_the_noise_gives_none(clock):
    unet = tiny.unet("sd1")
    unpatched = []

    def cost(settings, t, n):
        if settings is None:  # the unpatched model: 0.06 s in one round, 0.14 s in the next
            unpatched.append(n)
            return 0.06 if (len(unpatched) - 1) // 2 % 2 == 0 else 0.14
        return 0.09  # 10 % faster than its median: within the noise
    clock(unet, cost)
    result = agentsd.tune(unet, **SIZE, repeats=4, warmup=0, cache=False, progress=False)
    none, best = result.rows[0], result.best
    assert none.step_seconds == pytest.approx(0.1) and none.spread == pytest.approx(0.8)
    assert best.settings is not None and best.speedup == pytest.approx(0.1 / 0.09)  # faster, within the noise
    assert best.noise == pytest.approx(0.8) and result.config is None
    assert_choice_follows_the_table(result)


def test_interleaving_rotates_the_order_and_compiled_first_calls_are_apart(clock, monkeypatch):
    unet = tiny.unet("sd1")
    order = []

    def cost(settings, t, n):
        order.append((settings and settings.reduction, "agent" if t >= 600 else "late"))
        return 5.0 if order.count(order[-1]) == 1 else 0.1  # the first call of each candidate and phase compiles
    clock(unet, cost)
    monkeypatch.setattr(tune_module, "compile_state", lambda model: "regional")
    result = agentsd.tune(unet, **SIZE, repeats=3, warmup=1, cache=False, progress=False)
    assert result.compiled == "regional" and result.compile_seconds == pytest.approx(30.0)
    assert all(row.compile_seconds == pytest.approx(10.0) for row in result.rows)
    assert all(row.agent_seconds == pytest.approx(0.1) for row in result.rows)  # never counted
    assert "first calls s (compile)" in str(result)
    timed = order[12:]  # after 6 first calls and 6 warm-up calls
    visits = [timed[i][0] for i in range(0, len(timed), 2)]
    assert visits == [None, "merge", "pool", "merge", "pool", None, "pool", None, "merge"]
    assert [timed[i][1] for i in (0, 6, 12)] == ["agent", "late", "agent"]


def test_extra_candidates_and_the_stored_settings(clock):
    unet = tiny.unet("sd1")
    agentsd.store_config(unet, agentsd.AgentSDConfig(sx=2, sy=2))  # what apply_patch(unet) would run
    clock(unet, lambda s, t, n: 0.1 if s is None else 0.05 if s.ratio == 0.6 else 0.08)
    result = agentsd.tune(unet, **SIZE, candidates=[{"ratio": 0.6}, agentsd.AgentSDConfig(reduction="pool"),
                                                    agentsd.AgentSDConfig(reduction="pool", agent_fraction=1.0)],
                          repeats=2, warmup=0, cache=False, progress=False)
    assert [row.name for row in result.rows] == ["no patch", "merge", "pool", "merge: sx=2, sy=2", "merge: ratio=0.6",
                                                 "pool: agent_fraction=1.0"]  # the repeated pool once
    assert result.rows[5].agent_share == 1.0
    assert result.config == agentsd.AgentSDConfig(ratio=0.6)


# ----------------------------------------------------------------------------- compiled models


def test_compiled_models_are_detected(fresh_dynamo):
    pipe = tiny.sd_pipeline()
    assert tune_module.compile_state(pipe) is None
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    assert tune_module.compile_state(pipe) == "whole" and tune_module.compile_state(pipe.unet) == "whole"
    unet = tiny.unet("sd1")
    unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    assert tune_module.compile_state(unet) == "regional"


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(height=0), ValueError, "height must be an int >= 1"),
    (dict(height=66), ValueError, r"height must be a positive multiple of 4 \(the vae_scale_factor\), got 66"),
    (dict(width=64.0), TypeError, "width must be an int"),
    (dict(num_images=0), ValueError, "num_images must be an int >= 1"),
    (dict(guidance="yes"), TypeError, "guidance must be a bool"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an int >= 1"),
    (dict(repeats=0), ValueError, "repeats must be an int >= 1"),
    (dict(warmup=-1), ValueError, "warmup must be an int >= 0"),
    (dict(cache=3), TypeError, "cache must be a bool or a folder"),
    (dict(progress=None), TypeError, "progress must be a bool"),
    (dict(candidates={"ratio": 0.5}), TypeError, "candidates must be None or a list"),
    (dict(candidates=[3]), TypeError, r"candidates\[0\] must be an AgentSDConfig"),
    (dict(candidates=[{"ratio": 1.5}]), ValueError, r"candidates\[0\]: ratio must be in \[0, 1\)"),
    (dict(candidates=[{"bogus": 1}]), TypeError, r"candidates\[0\]: unknown setting\(s\) \['bogus'\]"),
])
def test_bad_arguments_raise_before_anything_is_timed(kwargs, error, match, tmp_path):
    pipe = tiny.sd_pipeline()
    agentsd.apply_patch(pipe, ratio=0.3)
    calls, _ = count_calls(pipe.unet)
    arguments = {**SIZE, "cache": tmp_path, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        agentsd.tune(pipe, **arguments)
    assert calls == [] and agentsd.patch_config(pipe) == agentsd.AgentSDConfig(ratio=0.3)
    assert list(tmp_path.iterdir()) == []


def test_a_candidate_the_model_cannot_take_raises_before_anything_is_timed():
    unet = tiny.unet("sdxl")  # no self-attention at the highest level
    calls, _ = count_calls(unet)
    with pytest.raises(ValueError, match="no self-attention at max_downsample=1"):
        agentsd.tune(unet, **SIZE, candidates=[{"max_downsample": 1}], cache=False, progress=False)
    assert calls == [] and not agentsd.is_patched(unet)


def test_unsupported_models_raise():
    with pytest.raises(TypeError, match="agentsd.tune: agentsd supports"):
        agentsd.tune(object(), **SIZE)
    with pytest.raises(TypeError, match="agentsd.tune: agentsd supports .*got Linear"):
        agentsd.tune(torch.nn.Linear(2, 2), **SIZE)


def test_script_help():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune.py"), "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert "--model" in out and "--sizes" in out and "--out" in out

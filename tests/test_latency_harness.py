"""The per-step latency harness on a tiny UNet: every method, resume, settings, shares, fused QKV."""
import json
from pathlib import Path

import pytest

import agentsd
from eval.latency import SettingsMismatch, run_benchmark, sample_timesteps
from eval.methods import DeepCacheSettings, Options, build_methods, per_step
from eval.report import latency_rows, latency_table, read_rows, saving_share
from eval.todo import ToDoSettings

import tiny

QUIET = dict(progress=lambda s: None)
DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_benchmark_runs_every_method_in_its_phase_and_resumes(tmp_path):
    unet = tiny.unet("sd1")
    methods = build_methods(["sd", "tomesd", "todo", "agentsd", "agentsd-pool", "agentsd:late", "bound"], [0.2, 0.5],
                            per_step(Options(phase="agent")))
    raw_path = tmp_path / "raw.json"
    raw = run_benchmark(unet, [128], methods, repeats=2, batch=2, raw_path=raw_path, **QUIET)
    rows = latency_rows(raw, methods, [128])
    assert [(r["method"], r["phase"]) for r in rows] == [
        ("sd", None), ("tomesd", None), ("tomesd", None), ("todo", None), ("agentsd", "agent"), ("agentsd", "agent"),
        ("agentsd-pool", "agent"), ("agentsd-pool", "agent"), ("agentsd", "late"), ("agentsd", "late"), ("bound", None)]
    assert all(r["repeats"] == 2 and r["median_s"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0
    table = latency_table(rows)
    assert "| 128 | agentsd | agent | 0.5 |" in table and "| 128 | agentsd | late | 0.2 |" in table
    # every method's settings are recorded with the samples: the phases, ToDo on at every step
    settings = json.loads(raw_path.read_text())["settings"]
    assert settings["methods"]["agentsd@0.5:late"] == {"ratio": 0.5, "reduction": "merge", "agent_fraction": 0.0}
    assert settings["methods"]["agentsd-pool@0.2:agent"]["reduction"] == "pool"
    assert settings["methods"]["todo"] == {"factor": 2.0, "mode": "nearest", "off_after": 1.0, "max_downsample": None}
    assert settings["fuse_qkv"] is False
    # a rerun with the samples on disk times nothing again
    before = raw_path.read_text()
    calls = []
    run_benchmark(unet, [128], methods, repeats=2, batch=2, raw_path=raw_path, progress=calls.append)
    assert calls == [] and raw_path.read_text() == before
    assert len(json.loads(before)["128"]) == len(methods)
    with pytest.raises(SettingsMismatch, match="batch"):
        run_benchmark(unet, [128], methods, repeats=2, batch=4, raw_path=raw_path, **QUIET)
    other = build_methods(["todo"], [], per_step(Options(todo=ToDoSettings(factor=3))))
    with pytest.raises(SettingsMismatch, match="todo.*'factor': 3"):
        run_benchmark(unet, [128], other, repeats=2, batch=2, raw_path=raw_path, **QUIET)
    assert not agentsd.is_patched(unet)


def test_shares_run_from_each_rows_baseline_to_its_own_bound():
    methods = build_methods(["sd", "agentsd", "bound", "agentsd-mlp", "bound-mlp", "deepcache", "agentsd+deepcache",
                             "bound+deepcache"], [0.4], Options(phase="agent"))
    seconds = {"sd": [1.0, 1.2, 1.1], "agentsd@0.4:agent": [0.9, 0.95, 5.0], "bound": [0.7, 0.71, 0.69],
               "agentsd-mlp@0.4:agent": [0.8], "bound-mlp": [0.6], "deepcache": [0.5],
               "agentsd+deepcache@0.4:agent": [0.45], "bound+deepcache": [0.4]}
    raw = {"64": {k: {"seconds": v, "peak_mb": 1.0} for k, v in seconds.items()}}
    rows = {r["key"]: r for r in latency_rows(raw, methods, [64])}
    assert rows["agentsd@0.4:agent"]["saving_share"] == pytest.approx((1.1 - 0.95) / (1.1 - 0.7))  # medians
    assert rows["agentsd@0.4:agent"]["speedup"] == pytest.approx(1.1 / 0.95)
    assert rows["agentsd-mlp@0.4:agent"]["saving_share"] == pytest.approx((1.1 - 0.8) / (1.1 - 0.6))
    assert rows["agentsd+deepcache@0.4:agent"]["saving_share"] == pytest.approx(0.5)  # deepcache -> its bound
    assert rows["deepcache"]["saving_share"] == 0 and rows["deepcache"]["speedup"] == pytest.approx(2.2)
    table = latency_table(list(rows.values()))
    assert "| 60 % (sd -> bound-mlp) |" in table and "| 50 % (deepcache -> bound+deepcache) |" in table
    assert "| 38 % |" in table  # the default pair (sd -> bound) is not spelled out


def test_merge_variants_have_their_own_bounds_and_compiled_runs_count_breaks(tmp_path, fresh_dynamo):
    unet = tiny.unet("sd1")
    names = ["sd", "tomesd", "todo", "agentsd", "agentsd-pool", "agentsd-xattn", "bound-xattn", "agentsd-mlp",
             "bound-mlp"]
    methods = build_methods(names, [0.4], per_step(Options(phase="agent")))
    processors = dict(unet.attn_processors)
    ff = [m.ff for m in unet.modules() if hasattr(m, "ff")]
    raw = run_benchmark(unet, [128], methods, repeats=1, batch=2, raw_path=tmp_path / "raw.json", compile=True,
                        backend="aot_eager", **QUIET)
    rows = {r["method"]: r for r in latency_rows(raw, methods, [128])}
    assert rows["agentsd-xattn"]["bound"] == "bound-xattn" and rows["agentsd-mlp"]["bound"] == "bound-mlp"
    for key in ("agentsd@0.4:agent", "agentsd-pool@0.4:agent", "todo"):  # one graph each
        assert raw["128"][key]["graph_breaks"] == 0 and raw["128"][key]["fullgraph"], key
    assert rows["tomesd"]["graph_breaks"] > 0 and not raw["128"]["tomesd@0.4"]["fullgraph"]  # its torch.Generator
    assert "graph breaks" in latency_table(list(rows.values()))
    # every method was switched off again
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert [m.ff for m in unet.modules() if hasattr(m, "ff")] == ff


def test_fused_qkv_runs_every_method_on_fused_projections(tmp_path):
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    unet = tiny.unet("sd1")
    methods = build_methods(["sd", "tomesd", "todo", "agentsd", "bound"], [0.4], per_step(Options(phase="agent")))
    raw_path = tmp_path / "raw.json"
    raw = run_benchmark(unet, [64], methods, repeats=1, batch=2, raw_path=raw_path, fuse_qkv=True, **QUIET)
    assert json.loads(raw_path.read_text())["settings"]["fuse_qkv"] is True
    assert all(raw["64"][m.key]["seconds"][0] > 0 for m in methods)
    # fused once, for every method: SDPA runs diffusers' fused processor, ToDo wraps it, AgentSD
    # leaves it in place and projects through to_qkv
    attn1 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())
    todo, agentsd_method = methods[2], methods[3]
    todo.apply(unet)
    assert isinstance(attn1.processor.original, FusedAttnProcessor2_0)
    todo.remove(unet)
    agentsd_method.apply(unet)
    assert isinstance(attn1.processor, FusedAttnProcessor2_0) and attn1.fused_projections
    agentsd_method.remove(unet)
    with pytest.raises(SettingsMismatch, match="fuse_qkv: True -> False"):
        run_benchmark(unet, [64], methods, repeats=1, batch=2, raw_path=raw_path, **QUIET)


def test_unknown_and_old_method_names():
    with pytest.raises(ValueError, match="unknown method 'fast'.*choose from sd, tomesd, todo, agentsd"):
        build_methods(["fast"], [0.4])
    with pytest.raises(ValueError, match="unknown method 'ddim\\+deepcache'"):
        build_methods(["ddim+deepcache"], [0.4])
    with pytest.raises(ValueError, match="only AgentSD methods have a phase"):
        build_methods(["tomesd:late"], [0.4])
    notes = []
    old = build_methods(["sdpa", "agentsd-agent", "agentsd-tome", "agentsd-agent-mlp", "agentsd-agent+deepcache"],
                        [0.4], Options(phase="agent"), notify=notes.append)
    assert [m.key for m in old] == ["sd", "agentsd@0.4:agent", "agentsd@0.4:late", "agentsd-mlp@0.4:agent",
                                    "agentsd+deepcache@0.4:agent"]
    assert notes[0] == "note: method 'sdpa' is deprecated; it is now 'sd'" and "'agentsd:late'" in notes[2]


def test_saving_share_is_left_out_when_the_bound_saves_nothing():
    assert saving_share(1.0, 0.9, 0.8) == pytest.approx(0.5)
    assert saving_share(1.0, 1.1, 0.8) == pytest.approx(-0.5)  # slower than the baseline
    assert saving_share(1.0, 0.9, 0.99) is None  # a 1 % possible saving: noise, not a share
    assert saving_share(None, 0.9, 0.8) is None


def test_deepcache_rows_time_a_cache_cycle_against_their_own_baseline_and_bound(tmp_path):
    unet = tiny.unet("sd1")
    options = Options(phase="agent", deepcache=DeepCacheSettings(cache_interval=2))
    methods = build_methods(["sd", "deepcache", "agentsd+deepcache", "todo+deepcache", "bound+deepcache"], [0.4],
                            per_step(options))
    assert [m.key for m in methods] == ["sd", "deepcache", "agentsd+deepcache@0.4:agent", "todo+deepcache",
                                        "bound+deepcache"]
    assert sample_timesteps(methods[1]) == (981, 961) and methods[2].baseline == "deepcache"
    forwards = {name: m.forward for name, m in unet.named_modules()}
    raw = run_benchmark(unet, [128], methods, repeats=1, batch=2, raw_path=tmp_path / "raw.json", **QUIET)
    rows = {r["method"]: r for r in latency_rows(raw, methods, [128])}
    assert rows["agentsd+deepcache"]["bound"] == "bound+deepcache"
    # DeepCache and the patches are off again: every module runs its own forward
    assert {name: m.forward for name, m in unet.named_modules()} == forwards and not agentsd.is_patched(unet)


def test_latency_files_of_earlier_versions_read_with_todays_names():
    rows = read_rows(DOCS / "cpu_latency/eager/latency.json")
    assert {(r["method"], r["phase"]) for r in rows} >= {("sd", None), ("agentsd", "agent"), ("agentsd", "late")}
    table = latency_table(rows)
    assert "| 512 | agentsd | late | 0.4 |" in table and "| 512 | sd | – | – |" in table
    cached = {r["method"]: r for r in read_rows(DOCS / "cpu_latency/deepcache/latency.json")}
    assert cached["agentsd+deepcache"]["baseline"] == "deepcache" and cached["sd"]["bound"] == "bound"


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_transformers_run_their_methods_and_refuse_the_unet_only_ones(tmp_path, family):
    denoiser = tiny.pixart_transformer() if family == "pixart" else tiny.sd3_transformer()
    methods = build_methods(["sd", "tomesd", "todo", "agentsd", "agentsd-pool@0.75", "bound", "deepcache"], [0.4],
                            per_step(Options(phase="agent")))
    raw = run_benchmark(denoiser, [64], methods, repeats=1, batch=2, raw_path=tmp_path / "raw.json", **QUIET)
    rows = {r["key"]: r for r in latency_rows(raw, methods, [64])}
    for key in ("sd", "todo", "agentsd@0.4:agent", "agentsd-pool@0.75:agent", "bound"):
        assert rows[key]["median_s"] > 0, key
    for key in ("tomesd@0.4", "deepcache"):
        assert "patches Stable Diffusion UNets only" in raw["64"][key]["error"]
    assert not agentsd.is_patched(denoiser) and not hasattr(denoiser, "_todo_patch")

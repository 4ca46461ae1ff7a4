import json

import pytest

import agentsd

from eval.latency import SettingsMismatch, build_methods, markdown_table, run_benchmark, summarize

import tiny


def test_benchmark_runs_every_method_and_resumes(tmp_path):
    unet = tiny.unet("sd1")
    unet.register_to_config(cross_attention_dim=32)
    methods = build_methods(["sdpa", "tomesd", "agentsd-agent", "agentsd-tome", "bound"], [0.2, 0.5])
    raw_path = tmp_path / "raw.json"
    raw = run_benchmark(unet, [128], methods, repeats=2, batch=2, raw_path=raw_path, progress=lambda s: None)
    rows = summarize(raw, methods, [128])
    assert [r["method"] for r in rows] == ["sdpa", "tomesd", "tomesd", "agentsd-agent", "agentsd-agent",
                                           "agentsd-tome", "agentsd-tome", "bound"]
    assert all(r["repeats"] == 2 and r["median_s"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[-1]["saving_share"] in (None, 1.0)
    assert "| 128 | agentsd-agent | 0.5 |" in markdown_table(rows)
    # a rerun with the samples on disk times nothing again
    before = raw_path.read_text()
    calls = []
    run_benchmark(unet, [128], methods, repeats=2, batch=2, raw_path=raw_path, progress=calls.append)
    assert calls == [] and raw_path.read_text() == before
    assert len(json.loads(before)["128"]) == len(methods)
    with pytest.raises(SettingsMismatch, match="batch"):
        run_benchmark(unet, [128], methods, repeats=2, batch=4, raw_path=raw_path, progress=calls.append)


def test_merge_variants_have_their_own_bounds_and_compiled_runs_count_breaks(tmp_path):
    unet = tiny.unet("sd1")
    names = ["sdpa", "tomesd", "agentsd-agent", "agentsd-agent-xattn", "bound-xattn", "agentsd-agent-mlp", "bound-mlp"]
    methods = build_methods(names, [0.4])
    processors = dict(unet.attn_processors)
    ff = [m.ff for m in unet.modules() if hasattr(m, "ff")]
    raw = run_benchmark(unet, [128], methods, repeats=1, batch=2, raw_path=tmp_path / "raw.json",
                        progress=lambda s: None, compile=True, backend="aot_eager")
    rows = {r["method"]: r for r in summarize(raw, methods, [128])}
    assert rows["agentsd-agent-xattn"]["bound"] == "bound-xattn" and rows["agentsd-agent-mlp"]["bound"] == "bound-mlp"
    assert rows["agentsd-agent"]["graph_breaks"] == 0 and raw["128"]["agentsd-agent@0.4"]["fullgraph"]
    assert rows["tomesd"]["graph_breaks"] > 0 and not raw["128"]["tomesd@0.4"]["fullgraph"]  # its torch.Generator
    assert "graph breaks" in markdown_table(list(rows.values()))
    # every method was switched off again
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert [m.ff for m in unet.modules() if hasattr(m, "ff")] == ff


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        build_methods(["fast"], [0.4])


def test_saving_share_is_left_out_when_the_bound_saves_nothing():
    from eval.latency import saving_share

    assert saving_share(1.0, 0.9, 0.8) == pytest.approx(0.5)
    assert saving_share(1.0, 1.1, 0.8) == pytest.approx(-0.5)  # slower than the baseline
    assert saving_share(1.0, 0.9, 0.99) is None  # a 1 % possible saving: noise, not a share
    assert saving_share(None, 0.9, 0.8) is None


def test_deepcache_rows_time_a_cache_cycle_against_their_own_baseline_and_bound(tmp_path):
    unet = tiny.unet("sd1")
    methods = build_methods(["sdpa", "deepcache", "agentsd-agent+deepcache", "bound+deepcache"], [0.4],
                            dict(cache_interval=2, cache_branch_id=0))
    assert [m.key for m in methods] == ["sdpa", "deepcache", "agentsd-agent+deepcache@0.4", "bound+deepcache"]
    assert methods[1].timesteps == (981, 961) and methods[2].baseline == "deepcache"
    forwards = {name: m.forward for name, m in unet.named_modules()}
    raw = run_benchmark(unet, [128], methods, repeats=1, batch=2, raw_path=tmp_path / "raw.json",
                        progress=lambda s: None)
    rows = {r["method"]: r for r in summarize(raw, methods, [128])}
    assert rows["agentsd-agent+deepcache"]["bound"] == "bound+deepcache"
    # DeepCache and the patch are off again: every module runs its own forward
    assert {name: m.forward for name, m in unet.named_modules()} == forwards and not agentsd.is_patched(unet)
    with pytest.raises(ValueError, match="unknown method 'ddim\\+deepcache'"):
        build_methods(["ddim+deepcache"], [0.4])

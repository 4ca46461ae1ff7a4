"""The FID benchmark harness end to end on a tiny pipeline, its resume, and its errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import generation, protocols, runtime
from eval.methods import build_methods, table_order
from eval.store import ImageStore, Timings, timings_path
import fid_helpers

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_fid.py"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return fid_helpers.save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def run(*args: str) -> None:
    from scripts.benchmark_fid import main

    main([*args, "--no-progress"])


def image_times(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted((out / "images").rglob("*.png"))}


def test_end_to_end_writes_every_output_and_resumes_without_regenerating(model_dir, clip_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--model", str(model_dir), "--num-images", "4", "--ratios", "0.4", "--steps", "3",
            "--batch-size", "2", "--grid-columns", "3", "--out", str(out), "--clip-model", str(clip_dir)]
    run(*args)
    for name in ("results.json", "results.md", "fid_vs_time.png", "fidelity_vs_time.png", "samples.png",
                 "state.json", "timings/process-0.json"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["num_processes"] == 1 and results["setup"]["compile"] is None
    rows = {(r["method"], r["ratio"]): r for r in results["rows"]}
    assert set(rows) == {("sd", None), ("tomesd", 0.4), ("agentsd", 0.4), ("bound", None)}
    for key in ("sd", "tomesd@0.4", "agentsd@0.4"):
        assert len(list((out / "images" / key).glob("*.png"))) == 4
    assert not (out / "images" / "bound").exists()
    for (method, _), r in rows.items():
        assert r["seconds_per_image"] > 0 and r["peak_memory_mb"] is not None
        # one process: the wall-clock throughput is the inverse of the device time per image
        assert r["images_per_second"] == pytest.approx(1 / r["seconds_per_image"])
        if method != "bound":
            assert np.isfinite(r["fid"]) and 0 <= r["adherence"] <= 1 and r["num_images"] == 4
            assert 0 <= r["clip_score"] <= 100
    assert rows[("sd", None)]["speedup"] == pytest.approx(1.0)
    assert rows[("sd", None)]["psnr"] is None and rows[("bound", None)]["psnr"] is None
    for key in (("tomesd", 0.4), ("agentsd", 0.4)):  # merged, so close to sd but not equal
        assert 10 < rows[key]["psnr"] < np.inf and 0 < rows[key]["ssim"] < 1
    table = (out / "results.md").read_text()
    assert "| agentsd | 0.4 |" in table and "PSNR vs sd dB | SSIM vs sd | CLIP score |" in table
    assert "images/s (1 process)" in table and "compile s" not in table
    # the same seeds: sd and agentsd differ (the patch acts) but start from the same noise
    sd = np.asarray(Image.open(out / "images" / "sd" / "00000.png"), dtype=float)
    agent = np.asarray(Image.open(out / "images" / "agentsd@0.4" / "00000.png"), dtype=float)
    assert 0 < np.abs(sd - agent).mean() < 60

    state = (out / "state.json").read_text()
    before = image_times(out)
    run(*args)
    assert image_times(out) == before, "a finished run must regenerate nothing"
    assert (out / "state.json").read_text() == state

    # an interruption that lost a batch of agentsd and one of tomesd regenerates those batches
    # only, bit for bit: tomesd's random dst is seeded per batch, not by whatever ran before
    lost = {"images/agentsd@0.4/00002.png", "images/agentsd@0.4/00003.png",
            "images/tomesd@0.4/00000.png", "images/tomesd@0.4/00001.png"}
    old = {name: (out / name).read_bytes() for name in lost}
    for name in lost:
        (out / name).unlink()
    run(*args)
    after = image_times(out)
    assert {k for k in after if after[k] != before.get(k)} == lost
    assert {name: (out / name).read_bytes() for name in lost} == old


def test_other_settings_in_the_same_folder_are_refused(model_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--model", str(model_dir), "--num-images", "2", "--methods", "sd", "--no-bound",
              "--batch-size", "2", "--out", str(out)]
    run(*common, "--steps", "2")
    with pytest.raises(SystemExit, match="other settings.*num_inference_steps"):
        run(*common, "--steps", "3")
    run(*common, "--steps", "3", "--fresh")  # starts over


def test_generation_and_metrics_can_run_on_different_machines(model_dir, tmp_path, monkeypatch):
    """--skip-metrics generates only (e.g. on a GPU without the FID network); the same command
    later computes the metrics without loading the model; resuming generation on another
    machine is refused, since the timings would mix."""
    out = tmp_path / "run"
    args = ["--model", str(model_dir), "--num-images", "2", "--methods", "sd", "--no-bound", "--steps", "2",
            "--batch-size", "2", "--out", str(out)]
    run(*args, "--skip-metrics")
    assert not (out / "results.json").exists() and len(list((out / "images" / "sd").glob("*.png"))) == 2
    generated_with = json.loads((out / "state.json").read_text())["generated_with"]

    def no_model(*a, **k):
        raise AssertionError("a finished generation must not load the model")

    with monkeypatch.context() as m:
        m.setattr(generation, "load_pipeline", no_model)
        run(*args)
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["machine"] == generated_with["machine"]
    assert np.isfinite(results["rows"][0]["fid"])

    (out / "images" / "sd" / "00001.png").unlink()
    monkeypatch.setattr(runtime, "machine_name", lambda device: "another machine")
    with pytest.raises(SystemExit, match="timings would mix"):
        run(*args)


def error_of(capsys, *args: str) -> str:
    """The message with which the script stops (in-process: it exits before any work)."""
    with pytest.raises(SystemExit) as stop:
        run(*args)
    return stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err.strip()


def test_errors_are_one_line_without_traceback(tmp_path):
    # --out in tmp_path: the default runs/fid_quick may hold a real run (whose other settings
    # would be the error instead) and must not be touched by a test
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert errors == [f"benchmark_fid.py: error: --model {tmp_path / 'missing'}: no such folder "
                      "(give a local pipeline folder or a hub id)"]
    assert not (tmp_path / "out").exists(), "a missing model is found before anything is written"


def test_bad_inputs_give_their_errors(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/fid_quick, is then the test's own
    (tmp_path / "not_a_pipeline").mkdir()
    assert "cannot load --model" in error_of(capsys, "--model", str(tmp_path / "not_a_pipeline"))
    assert "unknown method 'sdxl'" in error_of(capsys, "--methods", "sd", "sdxl")
    assert "--todo-factor" in error_of(capsys, "--todo-factor", "0.5")
    assert "--todo-off-after" in error_of(capsys, "--todo-off-after", "0")
    assert "--deepcache-interval must be >= 1" in error_of(capsys, "--deepcache-interval", "0")
    assert "ratios must be in [0, 1)" in error_of(capsys, "--ratios", "0.4", "1.5")
    assert "--ratios: invalid float value" in error_of(capsys, "--ratios", "half")
    assert "--size must be a positive multiple of 8" in error_of(capsys, "--size", "60")
    assert "--compile-backend needs --compile" in error_of(capsys, "--compile-backend", "eager")
    assert "--device 'gpu0' is not a device" in error_of(capsys, "--device", "gpu0")
    assert "--compile-backend 'inductr' is unknown" in error_of(capsys, "--compile", "--compile-backend", "inductr")
    assert "needs --model" in error_of(capsys, "--protocol", "paper")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in error_of(capsys, "--model", str(model_dir), "--reference-dir", str(empty))
    assert "is not a folder" in error_of(capsys, "--model", str(model_dir), "--reference-dir", str(tmp_path / "no"))
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (8, 8)).save(broken / "good.png")
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    assert "bad.jpg" in error_of(capsys, "--model", str(model_dir), "--reference-dir", str(broken))
    assert "--clip-model" in error_of(capsys, "--model", str(model_dir), "--clip-model", str(tmp_path / "no"))
    assert "cannot load --clip-model" in error_of(capsys, "--model", str(model_dir), "--clip-model", str(empty))


def test_reference_images_are_cropped_and_resized(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (10, 30), (0, 0, 255)).save(tmp_path / "sub.jpg")
    files = protocols.reference_files(tmp_path)
    images = protocols.load_reference_images(files, size=16)
    assert images.shape == (2, 16, 16, 3) and images[0, 8, 8, 0] == 255 and images[1, 8, 8, 2] > 250


def test_protocols():
    paper = protocols.paper_protocol()
    assert len(paper.prompts) == 2000 and len(set(paper.prompts)) == 998  # two class names repeat in ImageNet
    assert paper.prompts[0] == paper.prompts[1000] == "A high quality photograph of a tench."
    assert (paper.height, paper.num_inference_steps, paper.guidance_scale) == (512, 50, 7.5)
    shapes = protocols.shapes_protocol(6, steps=5, guidance=4.0, seed=3)
    assert shapes.seeds == (3, 4, 5, 6, 7, 8) and shapes.scores_adherence
    assert shapes.prompts == protocols.shapes_protocol(6, 5, 4.0, seed=3).prompts
    from eval.reference.shapes import parse_caption, render

    real = protocols.shapes_real_images(6, seed=3)
    attrs = parse_caption(shapes.prompts[0])
    assert real.shape == (6, 64, 64, 3)
    assert tuple(real[0, 1, 1]) == tuple(np.asarray(render(attrs))[1, 1])  # the background of the caption


def test_methods_are_ordered_with_their_bounds_and_validated():
    keys = [m.key for m in table_order(build_methods(["agentsd", "sd"], [0.2, 0.4]))]
    assert keys == ["sd", "agentsd@0.2", "agentsd@0.4", "bound"]
    keys = [m.key for m in table_order(build_methods(["agentsd-mlp", "todo", "agentsd-pool+deepcache"], [0.4]))]
    assert keys == ["todo", "agentsd-mlp@0.4", "agentsd-pool+deepcache@0.4", "bound", "bound-mlp", "bound+deepcache"]
    assert [m.key for m in table_order(build_methods(["todo", "sd"], []), bounds=False)] == ["sd", "todo"]
    with pytest.raises(ValueError, match="unknown method"):
        build_methods(["fast"], [0.4])
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        build_methods(["agentsd"], [-0.1])
    with pytest.raises(ValueError, match="agentsd needs at least one ratio"):
        build_methods(["agentsd"], [])


def test_compiled_run_reports_compile_time_apart_and_agentsd_traces_as_one_graph(model_dir, tmp_path, fresh_dynamo):
    """--compile with aot_eager (dynamo's tracing, guards and breaks, without code generation)."""
    out = tmp_path / "run"
    args = ["--model", str(model_dir), "--num-images", "3", "--ratios", "0.4", "--steps", "2", "--batch-size", "2",
            "--size", "32", "--out", str(out)]
    run(*args, "--compile", "--compile-backend", "aot_eager")
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["compile"] == "aot_eager"
    rows = {r["method"]: r for r in results["rows"]}
    for method in ("sd", "agentsd", "bound"):
        assert rows[method]["compile_mode"] == "fullgraph" and rows[method]["graph_breaks"] == 0, rows[method]
    # tomesd draws its dst with a torch.Generator: no single graph, so it runs with breaks
    assert rows["tomesd"]["compile_mode"] == "graph breaks" and rows["tomesd"]["graph_breaks"] > 0
    assert rows["tomesd"]["compile_errors"]["fullgraph"]
    for r in rows.values():  # batches of 2 and 1 images were compiled before any timed batch
        assert r["compile_seconds"] > 0 and r["compiled_while_timed"] == 0 and r["seconds_per_image"] > 0
    assert "| compiled | compile s | graph breaks |" in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="other settings.*compile: 'aot_eager' -> None"):
        run(*args)


def test_a_method_that_does_not_compile_runs_eagerly_and_is_reported(model_dir, tmp_path, fresh_dynamo):
    def broken(graph, example_inputs):
        raise RuntimeError("no compiler here")

    from diffusers import StableDiffusionPipeline

    methods = build_methods(["agentsd"], [0.4])
    protocol = protocols.shapes_protocol(2, steps=2, guidance=3.0, size=32)
    images = {}
    for name, backend in (("eager", None), ("broken", broken)):
        generation.generate_all(lambda: StableDiffusionPipeline.from_pretrained(model_dir), methods, protocol,
                                tmp_path / name, 2, {"compile": name}, progress=False, compile_backend=backend)
        images[name] = ImageStore(tmp_path / name / "images").load("agentsd@0.4", 2)
    report = Timings(timings_path(tmp_path / "broken", 0)).data["agentsd@0.4"]["compile"]
    assert report["mode"] == "eager"
    assert all("no compiler here" in report["errors"][mode] for mode in ("fullgraph", "graph breaks")), report
    np.testing.assert_array_equal(images["broken"], images["eager"])


def test_deepcache_rows_with_their_own_bound(model_dir, tmp_path):
    keys = [m.key for m in table_order(build_methods(["sd", "deepcache", "agentsd+deepcache"], [0.4]))]
    assert keys == ["sd", "deepcache", "agentsd+deepcache@0.4", "bound", "bound+deepcache"]
    out = tmp_path / "run"
    run("--model", str(model_dir), "--methods", "sd", "agentsd", "deepcache", "tomesd+deepcache", "agentsd+deepcache",
        "--num-images", "2", "--ratios", "0.4", "--steps", "6", "--batch-size", "2", "--size", "32",
        "--deepcache-interval", "2", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    recorded = results["setup"]["methods"]
    assert recorded["deepcache"]["deepcache"] == recorded["bound+deepcache"]["deepcache"] == {
        "cache_interval": 2, "cache_branch_id": 0}
    assert "deepcache" not in recorded["agentsd@0.4"]
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"sd", "agentsd", "deepcache", "tomesd+deepcache", "agentsd+deepcache", "bound",
                         "bound+deepcache"}
    images = {m: np.stack([np.asarray(Image.open(p)) for p in sorted((out / "images" / k).glob("*.png"))])
              for m, k in (("sd", "sd"), ("deepcache", "deepcache"), ("both", "agentsd+deepcache@0.4"))}
    assert not np.array_equal(images["deepcache"], images["sd"])  # DeepCache was on
    assert not np.array_equal(images["both"], images["deepcache"])  # and AgentSD on top of it
    assert rows["deepcache"]["psnr"] is not None and rows["bound+deepcache"]["num_images"] == 0


def test_todo_and_pooled_agentsd_rows_record_their_settings_and_folders_take_more_methods(model_dir, tmp_path):
    """todo and agentsd-pool run like the other rows; a folder takes more methods later, but a
    method recorded with other settings (ToDo's off step here) is refused."""
    out = tmp_path / "run"
    common = ["--model", str(model_dir), "--num-images", "2", "--ratios", "0.4", "--steps", "5", "--batch-size", "2",
              "--size", "32", "--out", str(out)]
    run(*common, "--methods", "sd", "todo", "--todo-off-after", "0.6", "--skip-metrics")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images" / "todo").glob("*.png")}
    run(*common, "--methods", "sd", "todo", "agentsd-pool", "--todo-off-after", "0.6")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images" / "todo").glob("*.png")} == before
    results = json.loads((out / "results.json").read_text())
    recorded = results["setup"]["methods"]
    assert recorded["todo"] == {"factor": 2.0, "mode": "nearest", "off_after": 0.6, "max_downsample": None}
    assert recorded["agentsd-pool@0.4"] == {"ratio": 0.4, "reduction": "pool", "agent_fraction": 0.4}
    rows = {r["key"]: r for r in results["rows"]}
    assert set(rows) == {"sd", "todo", "agentsd-pool@0.4", "bound"}
    for key in ("todo", "agentsd-pool@0.4"):  # they act, and start from sd's noise
        assert 10 < rows[key]["psnr"] < np.inf and rows[key]["bound"] == "bound", key
    with pytest.raises(SystemExit, match="other settings.*todo.*'off_after': 0.6.*'off_after': 0.8"):
        run(*common, "--methods", "sd", "todo")


def test_result_files_of_earlier_versions_still_give_tables_and_plots(tmp_path):
    from eval import plots
    from eval.report import fid_table, read_rows

    docs = Path(__file__).resolve().parents[1] / "docs"
    rows = {r["method"]: r for r in read_rows(docs / "fid_cpu_deepcache" / "results.json")}
    assert rows["agentsd+deepcache"]["baseline"] == "deepcache" and rows["agentsd"]["phase"] == "schedule"
    table = fid_table(list(rows.values()))
    assert "| agentsd+deepcache | 0.4 |" in table and "(deepcache -> bound+deepcache)" in table
    plots.plot_fid_vs_time(list(rows.values()), tmp_path / "fid.png")
    assert (tmp_path / "fid.png").stat().st_size > 0

"""The FID harness under ``accelerate launch`` with 2 CPU processes, against one process.

Every run is a subprocess with one thread per process (OMP_NUM_THREADS=1): token matching turns
the float differences between thread counts into other merges, so images are bit-identical
across process counts only at equal threads per process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_fid.py"
# torchrun's workers (accelerate's multi-process launcher); on a machine without GPUs the script
# makes them CPU processes with the gloo backend
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def harness(out: Path, model: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    """Run the harness (5 images in batches of 2: process 0 gets images 0-1 and 4, process 1
    images 2-3) and fail the test on an error."""
    args = [str(SCRIPT), "--model", str(model), "--num-images", "5", "--batch-size", "2", "--ratios", "0.4",
            "--steps", "3", "--size", "32", "--device", "cpu", "--no-progress", "--out", str(out), *extra]
    proc = subprocess.run([*(LAUNCH if processes == 2 else [sys.executable]), *args], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def images(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted((out / "images").rglob("*.png"))}


def test_two_processes_write_what_one_process_writes_and_resume(model_dir, tmp_path):
    two, again, one = tmp_path / "two", tmp_path / "again", tmp_path / "one"
    harness(two, model_dir, 2)
    for name in ("results.json", "results.md", "fid_vs_time.png", "fidelity_vs_time.png", "samples.png",
                 "state.json", "timings/process-0.json", "timings/process-1.json"):
        assert (two / name).stat().st_size > 0, name
    results = json.loads((two / "results.json").read_text())
    assert results["setup"]["num_processes"] == 2 and "1 threads" in results["setup"]["machine"]
    assert "images/s (2 processes)" in (two / "results.md").read_text()
    shards = [json.loads((two / f"timings/process-{rank}.json").read_text()) for rank in (0, 1)]
    assert set(shards[0]["agentsd@0.4"]["batch_seconds"]) == {"0:2", "4:5"}  # batch i on process i % 2
    assert set(shards[1]["agentsd@0.4"]["batch_seconds"]) == {"2:4"}
    assert set(shards[0]["bound"]["batch_seconds"]) == {"0:2"} and set(shards[1]["bound"]["batch_seconds"]) == {"2:4"}
    for r in results["rows"]:
        per_process = [sum(s[f"{r['method']}@0.4" if r["ratio"] else r["method"]]["batch_seconds"].values())
                       for s in shards]
        timed = 5 if r["method"] != "bound" else 4
        assert r["seconds_per_image"] * timed == pytest.approx(sum(per_process))
        assert r["images_per_second"] == pytest.approx(timed / max(per_process))
        if r["method"] != "bound":
            assert r["fid"] is not None and (r["psnr"] is not None) == (r["method"] != "sd")
    first = images(two)
    assert len(first) == 15

    harness(again, model_dir, 2, "--skip-metrics")
    assert images(again) == first, "the same command writes the same files, tomesd included"
    harness(one, model_dir, 1, "--skip-metrics")
    assert images(one) == first, "one process writes the images of two, bit for bit"

    state = (two / "state.json").read_text()
    shard_files = [(two / f"timings/process-{r}.json").read_text() for r in (0, 1)]
    before = mtimes(two)
    harness(two, model_dir, 2)
    assert mtimes(two) == before, "a finished run regenerates nothing"
    assert (two / "state.json").read_text() == state

    lost = ["images/tomesd@0.4/00002.png", "images/tomesd@0.4/00003.png"]  # process 1's last batch
    for name in lost:
        (two / name).unlink()
    refused = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model_dir), "--num-images", "5",
                              "--batch-size", "2", "--ratios", "0.4", "--steps", "3", "--size", "32", "--device",
                              "cpu", "--out", str(two)], env=ENV, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "timings would mix" in refused.stderr and "'num_processes': 2" in refused.stderr
    harness(two, model_dir, 2, "--skip-metrics")
    after = mtimes(two)
    assert {k for k in after if after[k] != before.get(k)} == set(lost)
    assert images(two) == first
    assert (two / "timings/process-0.json").read_text() == shard_files[0]  # process 0 had nothing to do
    old, new = (json.loads(text) for text in (shard_files[1], (two / "timings/process-1.json").read_text()))
    # process 1 generated exactly one more batch, of tomesd, and recorded its time again
    assert {k: e["generated"] for k, e in old.items()} == {k: 1 for k in old}  # batch 2:4 of every method
    assert new["tomesd@0.4"]["generated"] == 2
    new["tomesd@0.4"]["generated"] = 1
    new["tomesd@0.4"]["batch_seconds"]["2:4"] = old["tomesd@0.4"]["batch_seconds"]["2:4"]
    assert new == old, "only the regenerated batch changed"

"""The reports of both harnesses: their rows (times, speed-ups, shares of the possible saving),
one markdown-table writer, the description of how a table was measured, the result files, and
reading result files back (those of earlier versions too, whose method names are mapped to
today's). The plots are in :mod:`eval.plots`."""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.methods import ALIASES, Method, parse_name


def saving_share(t_base: float | None, t: float | None, t_bound: float | None,
                 min_saving: float = 0.02) -> float | None:
    """``(t_base - t) / (t_base - t_bound)``: the share of the possible saving reached. None when a
    time is missing or the bound saves less than ``min_saving`` of ``t_base``: then there is
    nothing to share, and the ratio would only magnify noise."""
    if not (t_base and t and t_bound) or t_base - t_bound < min_saving * t_base:
        return None
    return (t_base - t) / (t_base - t_bound)


def add_shares(rows: list[dict[str, Any]], time_key: str, group: str | None = None) -> list[dict[str, Any]]:
    """Set every row's ``speedup`` over ``sd`` and ``saving_share`` (from its ``baseline`` to its
    ``bound``), comparing only rows of the same ``group`` value (e.g. the image size)."""
    for value in {r.get(group) for r in rows} if group else [None]:
        same = [r for r in rows if group is None or r.get(group) == value]
        times = {r["method"]: r[time_key] for r in same if r.get("ratio") is None}
        for r in same:
            t = r[time_key]
            r["speedup"] = times["sd"] / t if times.get("sd") and t else None
            r["saving_share"] = saving_share(times.get(r["baseline"]), t, times.get(r["bound"]))
    return rows


def _identity(m: Method) -> dict[str, Any]:
    return dict(method=m.name, key=m.key, ratio=m.ratio, phase=m.phase, baseline=m.baseline, bound=m.bound)


def failures(timings: list[Any]) -> dict[str, str]:
    """Method key: why it did not run (the first error recorded by any process of an FID run)."""
    out: dict[str, str] = {}
    for record in timings:
        for key, entry in record.data.items():
            if entry.get("error"):
                out.setdefault(key, entry["error"])
    return out


def latency_rows(raw: dict[str, Any], methods: list[Method], sizes: list[int]) -> list[dict[str, Any]]:
    """One row per (size, method) of a latency run: median and minimum seconds per step, peak
    memory, speed-up, share of the possible saving and, when compiled, the first call's seconds
    and the graph breaks; a method that did not run has its ``reason`` and no times."""
    rows = []
    for size in sizes:
        for m in methods:
            entry = raw[str(size)][m.key]
            seconds, reason = entry["seconds"], entry.get("error")
            timed = bool(seconds) and reason is None
            rows.append(dict(size=size, **_identity(m), median_s=statistics.median(seconds) if timed else None,
                             min_s=min(seconds) if timed else None, repeats=len(seconds) if timed else 0,
                             peak_mb=entry.get("peak_mb"), first_call_s=entry.get("first_call_s"),
                             graph_breaks=entry.get("graph_breaks"), reason=reason))
    return add_shares(rows, "median_s", group="size")


def fid_rows(state: Any, timings: list[Any], methods: list[Method], num_images: int, scores_adherence: bool,
             clip_model: str | None = None) -> list[dict[str, Any]]:
    """One row per method of an FID run: its metrics (fid, adherence, psnr and ssim against ``sd``,
    the CLIP score of ``clip_model`` when given), seconds per image (summed batch times of all
    processes / images: the device time an image costs), images per second (images / the
    longest summed time of one process: the run's wall-clock throughput), speed-up and share of
    the possible saving, peak memory (the largest of the processes), the compile report when
    compiled, and the number of images. A method that did not run (:func:`failures`) has its
    ``reason`` and nothing measured."""
    from eval.generation import COMPILE_MODES

    rows, failed = [], failures(timings)
    for m in methods:
        if m.key in failed:
            rows.append(dict(**_identity(m), fid=None, psnr=None, ssim=None, seconds_per_image=None,
                             images_per_second=None, peak_memory_mb=None, num_images=0, reason=failed[m.key]))
            continue
        entry = state.variant(m.key)
        records = [t.data[m.key] for t in timings if m.key in t.data]
        batch_seconds = {k: s for r in records for k, s in r["batch_seconds"].items()}
        images = sum(int(k.split(":")[1]) - int(k.split(":")[0]) for k in batch_seconds)
        longest = max((sum(r["batch_seconds"].values()) for r in records), default=0)
        memory = [r["peak_memory_mb"] for r in records if r.get("peak_memory_mb") is not None]
        row: dict[str, Any] = dict(
            **_identity(m), fid=entry.get("fid"), psnr=entry.get("psnr"), ssim=entry.get("ssim"),
            seconds_per_image=sum(batch_seconds.values()) / images if images else None,
            images_per_second=images / longest if longest else None,
            peak_memory_mb=max(memory, default=None), num_images=num_images if m.keeps_images else 0, reason=None,
        )
        if scores_adherence and m.keeps_images:
            row["adherence"] = entry.get("adherence", {}).get("all_correct")
        if clip_model is not None and m.keeps_images:
            row["clip_score"] = entry.get("clip_score", {}).get("score")
        compiled = [r["compile"] for r in records if "compile" in r]
        if compiled:
            row.update(
                compile_mode=COMPILE_MODES[max(COMPILE_MODES.index(c["mode"]) for c in compiled)],
                compile_seconds=max(c["seconds"] for c in compiled),
                graph_breaks=max(c["graph_breaks"] for c in compiled),
                compiled_while_timed=sum(c["compiled_while_timed"] for c in compiled),
                compile_errors={mode: e for c in compiled for mode, e in c["errors"].items()},
            )
        rows.append(row)
    return add_shares(rows, "seconds_per_image")


def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else format(value, spec) + unit


def _share(r: dict[str, Any]) -> str:
    if r.get("saving_share") is None:
        return "–"
    between = "" if (r["baseline"], r["bound"]) == ("sd", "bound") else f" ({r['baseline']} -> {r['bound']})"
    return fmt(100 * r["saving_share"], ".0f", " %") + between


Column = tuple[str, Callable[[dict[str, Any]], str]]


def markdown_table(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    """``rows`` as a markdown table of ``columns`` (header, cell of a row); a last column gives
    the reason of every row that did not run, when one did not."""
    if any(r.get("reason") for r in rows):
        columns = [*columns, ("not run because", lambda r: (r.get("reason") or "").replace("|", "\\|"))]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows])


def _phase_column(rows: list[dict[str, Any]]) -> list[Column]:
    shown = any(r.get("phase") not in (None, "schedule") for r in rows)
    return [("phase", lambda r: r.get("phase") or "–")] if shown else []


def latency_table(rows: list[dict[str, Any]]) -> str:
    """The latency rows as a table (with first-call time and graph breaks when compiled)."""
    columns: list[Column] = [
        ("size", lambda r: str(r["size"])), ("method", lambda r: r["method"]), *_phase_column(rows),
        ("ratio", lambda r: fmt(r["ratio"], "g")), ("median s/step", lambda r: fmt(r["median_s"], ".3f")),
        ("speed-up vs sd", lambda r: fmt(r["speedup"], ".2f", "x")), ("share of possible saving", _share),
        ("peak memory MB", lambda r: fmt(r.get("peak_mb"), ".0f")),
    ]
    if any(r.get("graph_breaks") is not None for r in rows):
        columns += [("first call s (compiles)", lambda r: fmt(r.get("first_call_s"), ".1f")),
                    ("graph breaks", lambda r: fmt(r.get("graph_breaks"), "d"))]
    return markdown_table(rows, columns)


def fid_table(rows: list[dict[str, Any]], num_processes: int = 1) -> str:
    """The FID rows as a table: FID, adherence, PSNR and SSIM against ``sd``, CLIP score (each when
    measured), seconds per image, speed-up, share of the possible saving, images per second of
    the ``num_processes`` processes together, peak memory, the compile report and images."""
    def metric(key: str, header: str, spec: str, scale: float = 1, unit: str = "") -> list[Column]:
        if not any(r.get(key) is not None for r in rows):
            return []
        return [(header, lambda r: fmt(None if r.get(key) is None else scale * r[key], spec, unit))]

    plural = "es" if num_processes > 1 else ""
    columns: list[Column] = [
        ("method", lambda r: r["method"]), *_phase_column(rows), ("ratio", lambda r: fmt(r["ratio"], "g")),
        ("FID", lambda r: fmt(r["fid"], ".2f")), *metric("adherence", "adherence", ".1f", 100, " %"),
        *metric("psnr", "PSNR vs sd dB", ".2f"), *metric("ssim", "SSIM vs sd", ".4f"),
        *metric("clip_score", "CLIP score", ".2f"),
        ("s/image", lambda r: fmt(r["seconds_per_image"], ".4f")),
        ("speed-up vs sd", lambda r: fmt(r["speedup"], ".2f", "x")),
        ("share of possible saving", _share),
        (f"images/s ({num_processes} process{plural})", lambda r: fmt(r["images_per_second"], ".2f")),
        ("peak memory MB", lambda r: fmt(r["peak_memory_mb"], ".0f")),
    ]
    if any(r.get("compile_mode") for r in rows):
        columns += [("compiled", lambda r: r.get("compile_mode", "–")),
                    ("compile s", lambda r: fmt(r.get("compile_seconds"), ".1f")),
                    ("graph breaks", lambda r: fmt(r.get("graph_breaks"), "d"))]
    return markdown_table(rows, [*columns, ("images", lambda r: str(r["num_images"]))])


def describe_fid(setup: dict[str, Any]) -> str:
    """One paragraph on how an FID table was measured."""
    p, n = setup["protocol"], setup["num_processes"]
    compiled = (f"transformer blocks compiled ({setup['compile']}; compile time excluded from the timings, "
                "reported apart); " if setup.get("compile") else "")
    return (
        f"{setup['model']}, protocol `{p['name']}`: {p['num_images']} images per row, {p['height']}x{p['width']} px, "
        f"{p['num_inference_steps']} steps of {setup['scheduler']}, guidance {p['guidance_scale']:g}, "
        f"batch {setup['batch_size']}, {setup['dtype']} on {setup['machine']}, {n} process{'es' if n > 1 else ''}; "
        f"{compiled}FID against {setup['num_real']} real images; PSNR and SSIM against the sd image of the same "
        "seed; seconds per image = summed wall time of the row's batches in all processes / images (the device "
        "time an image costs); images/s = images / the longest summed time of one process (the wall-clock "
        "throughput of the run); batches interleaved across methods."
    )


def describe_latency(info: dict[str, Any]) -> str:
    """One line on how a latency table was measured."""
    compiled = "transformer blocks compiled (compile_repeated_blocks)" if info["compile"] else "eager"
    fused = ", fused QKV projections (fuse_qkv_projections, FusedAttnProcessor2_0)" if info.get("fuse_qkv") else ""
    return (f"{info['model']}, batch {info['batch']}, {compiled}{fused}, {info['dtype'].removeprefix('torch.')}, "
            f"{info['machine']}; torch {info['torch']}; median of {info['repeats']} interleaved steps; AgentSD "
            "rows in the phase shown, ToDo on at every step.")


def write_fid_results(rows: list[dict[str, Any]], setup: dict[str, Any], out: Path) -> str:
    """``results.json`` (setup and rows) and ``results.md`` (a header line and the table); returns the latter."""
    (out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    text = describe_fid(setup) + "\n\n" + fid_table(rows, setup["num_processes"]) + "\n"
    (out / "results.md").write_text(text)
    return text


def write_latency_results(rows: list[dict[str, Any]], info: dict[str, Any], out: Path) -> str:
    """``latency.json`` (the settings and rows) and ``latency.md``; returns the latter."""
    (out / "latency.json").write_text(json.dumps({**info, "rows": rows}, indent=1) + "\n")
    text = describe_latency(info) + "\n\n" + latency_table(rows) + "\n"
    (out / "latency.md").write_text(text)
    return text


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``results.json`` or ``latency.json``, also of earlier versions: old method
    names become today's (``sdpa`` -> ``sd``, ``agentsd-agent`` -> ``agentsd`` in the agent phase,
    ...), and rows without a baseline or bound get those of their method."""
    rows = json.loads(Path(path).read_text())["rows"]
    for r in rows:
        name = ALIASES.get(r["method"], r["method"])
        spec, cached, pinned = parse_name(name)
        r["method"] = name.partition(":")[0]
        if "phase" not in r:  # earlier latency files timed the agent phase unless the name said otherwise
            r["phase"] = pinned or (None if spec.agentsd is None else "agent" if "size" in r else "schedule")
        r["baseline"] = "deepcache" if cached else "sd"
        r.setdefault("bound", spec.bound + ("+deepcache" if cached else ""))
    return rows

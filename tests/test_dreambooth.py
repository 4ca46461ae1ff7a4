"""DreamBooth finetuning with AgentSD on every step: training, saving, reloading, resuming, errors."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import agentsd
import tiny
from agentsd.config import DEFAULT_RATIO
from agentsd.training import (
    Batch,
    DreamBoothSettings,
    checkpoint_dirs,
    dreambooth_loss,
    encode_images,
    encode_prompt,
    generate_class_images,
    load_images,
    load_pipeline,
    missing_class_images,
    train_dreambooth,
)
from eval import REFERENCE_MODEL
from eval.dreambooth_benchmark import BOUND, CONFIGS
from eval.reference import shapes
from scripts.benchmark_dreambooth import main as benchmark_main
from scripts.train_dreambooth import main as train_main

PROMPT = "a white sks on a black background"


@pytest.fixture(scope="module")
def base_model() -> str:
    """The pipeline the tests finetune (64 px, 16 x 16 latents)."""
    return str(REFERENCE_MODEL)


def settings(base: str, instance: Path, out: Path, **kwargs) -> DreamBoothSettings:
    values = dict(
        pretrained=base, instance_dir=str(instance), instance_prompt=PROMPT, output_dir=str(out), resolution=64,
        max_train_steps=4, learning_rate=1e-4, checkpointing_steps=2, inference_steps=2, progress=False,
    )
    values.update(kwargs)
    return DreamBoothSettings(**values)


def agent_phases(pipe: StableDiffusionPipeline, steps: int = 3) -> list[bool]:
    """Generate once; for every UNet call (one per timestep), whether it ran the agent phase."""
    hooks = dict(pipe.unet._forward_pre_hooks)
    phases = tiny.record_phases(pipe)
    image = pipe(PROMPT, num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0)).images
    pipe.unet._forward_pre_hooks.clear()
    pipe.unet._forward_pre_hooks.update(hooks)
    assert np.isfinite(image).all() and len(phases) == len(pipe.scheduler.timesteps) >= steps
    return [p == "agent" for p in phases]


@pytest.fixture(scope="module")
def full_run(base_model: str, instance_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DreamBoothSettings:
    """Full-UNet finetuning with AgentSD, prior preservation and validation images."""
    s = settings(
        base_model, instance_dir, tmp_path_factory.mktemp("full"), max_train_steps=6,
        class_prompt="a white triangle on a black background", num_class_images=2, prior_loss_weight=0.5,
        validation_prompt=PROMPT, validation_steps=3, num_validation_images=1, checkpointing_steps=3,
    )
    train_dreambooth(s)
    return s


# ----------------------------------------------------------------------------- training and reloading


def fixed_batch_loss(pipe: StableDiffusionPipeline, instance: Path) -> float:
    """Instance loss, with AgentSD on every step, on a fixed batch: every image at 8 timesteps."""
    images = load_images(instance, 64)
    mean, _ = encode_images(pipe.vae, images)
    latents = mean.repeat_interleave(8, 0)
    timesteps = torch.linspace(50, 950, 8).long().repeat(len(images))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    embedding = encode_prompt(pipe, PROMPT).expand(len(latents), -1, -1)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    with agentsd.patched(pipe, ratio=0.4, agent_fraction=1.0), torch.no_grad():
        loss, _, _ = dreambooth_loss(pipe.unet, scheduler, Batch(latents, embedding, noise, timesteps, len(latents)))
    return float(loss)


def test_training_lowers_the_loss_and_keeps_the_rest(full_run: DreamBoothSettings, instance_dir: Path) -> None:
    out = Path(full_run.output_dir)
    before = fixed_batch_loss(load_pipeline(full_run.pretrained), instance_dir)
    after = fixed_batch_loss(load_pipeline(str(out)), instance_dir)
    assert after < 0.9 * before
    assert sorted(p.name for p in (out / "class_images").glob("*.png")) == ["class_00000.png", "class_00001.png"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000003-0.png", "step-000006-0.png"]
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000003", "step-000006"]
    base, tuned = load_pipeline(full_run.pretrained), load_pipeline(str(out))
    for name in ("vae", "text_encoder"):  # frozen
        for (key, a), b in zip(getattr(base, name).state_dict().items(), getattr(tuned, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key} changed"


def test_class_image_cache_is_reused_and_checked(full_run: DreamBoothSettings) -> None:
    folder = Path(full_run.output_dir) / "class_images"
    before = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    generate_class_images(None, folder, full_run.class_prompt, 2, 64)  # complete: no pipeline needed
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert missing_class_images(folder, full_run.class_prompt, 4, 64) == [2, 3]  # what processes share out
    with pytest.raises(ValueError, match="was made for .*white triangle"):
        generate_class_images(None, folder, "a red circle on a blue background", 2, 64)


def test_saved_pipeline_runs_agent_attention_on_every_step(full_run: DreamBoothSettings) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(full_run.output_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = agentsd.AgentSDConfig(ratio=0.4, agent_fraction=1.0)
    assert agentsd.stored_config(pipe) == expected
    agentsd.apply_patch(pipe)  # no arguments: the stored settings
    assert agentsd.patch_config(pipe) == expected
    assert all(agent_phases(pipe))
    agentsd.apply_patch(pipe, ratio=0.2)  # keywords override the stored settings
    assert agentsd.patch_config(pipe) == dataclasses.replace(expected, ratio=0.2)
    agentsd.remove_patch(pipe)


@pytest.mark.parametrize("reduction", ["merge", "pool"])
def test_lora_weights_reload_and_run_agent_attention_on_every_step(
    base_model: str, instance_dir: Path, tmp_path: Path, reduction: str
) -> None:
    s = settings(
        base_model, instance_dir, tmp_path / "lora", lora_rank=4, learning_rate=1e-3, gradient_accumulation_steps=2,
        reduction=reduction,
    )
    out = train_dreambooth(s)
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / "unet").exists()
    pipe = load_pipeline(base_model)
    base = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(out)
    agentsd.apply_patch(pipe, config=agentsd.load_config(out))
    assert agentsd.patch_config(pipe) == s.agentsd_config()
    assert (agentsd.patch_config(pipe).reduction, agentsd.patch_config(pipe).ratio) == (
        reduction, DEFAULT_RATIO[reduction])
    assert all(agent_phases(pipe, steps=2))
    agentsd.remove_patch(pipe)
    lora = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert not np.allclose(base, lora)  # the adapters are loaded and do something


def test_resume_continues_from_the_same_step(base_model: str, instance_dir: Path, tmp_path: Path) -> None:
    whole = settings(base_model, instance_dir, tmp_path / "whole", agentsd=False)
    train_dreambooth(whole)
    assert [p.name for p in checkpoint_dirs(whole.output_dir)] == ["step-000002", "step-000004"]
    resumed = dataclasses.replace(whole, output_dir=str(tmp_path / "resumed"))
    train_dreambooth(resumed, resume=str(Path(whole.output_dir) / "checkpoints" / "step-000002"))
    assert [p.name for p in checkpoint_dirs(resumed.output_dir)] == ["step-000004"]  # steps 3 and 4 only
    a = load_pipeline(whole.output_dir).unet.state_dict()
    b = load_pipeline(resumed.output_dir).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same result as without interruption
    assert any(not torch.equal(a[k], v) for k, v in load_pipeline(base_model).unet.state_dict().items())
    plain = load_pipeline(whole.output_dir)
    assert agentsd.stored_config(plain) is None  # finetuned without AgentSD: nothing stored
    assert agentsd.patch_config(agentsd.apply_patch(plain)) == agentsd.AgentSDConfig()
    with pytest.raises(ValueError, match="seed=0 .now 1"):
        train_dreambooth(dataclasses.replace(whole, seed=1, max_train_steps=5), resume=True)


# ----------------------------------------------------------------------------- stored settings


def test_settings_file_round_trip_and_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = agentsd.AgentSDConfig(ratio=0.3, agent_fraction=1.0, seed=3)
    path = agentsd.save_config(config, tmp_path)
    assert agentsd.load_config(tmp_path) == config and agentsd.load_config(path) == config
    with pytest.raises(FileNotFoundError, match="agentsd_config.json"):
        agentsd.load_config(tmp_path / "nothing")
    path.write_text('{"ratio": 0.3, "speed": 2}')  # a key of a newer version: ignored, with a warning
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        assert agentsd.load_config(tmp_path) == agentsd.AgentSDConfig(ratio=0.3)
    assert "ignoring unknown AgentSD setting(s) ['speed']" in caplog.text
    path.write_text('{"ratio": 1.5}')
    with pytest.raises(ValueError, match="ratio must be in"):
        agentsd.load_config(tmp_path)
    with pytest.raises(TypeError, match="config must be an AgentSDConfig"):
        agentsd.apply_patch(tiny.unet(), config={"ratio": 0.3})


def test_agent_fraction_one_covers_the_last_step() -> None:
    config = agentsd.AgentSDConfig(agent_fraction=1.0)
    assert config.phase_at(0) == config.agent_phase  # the last step, at timestep 0
    assert agentsd.AgentSDConfig(agent_fraction=0.99).phase_at(9.9) == config.tome_phase


def test_config_argument_is_overridden_by_keywords() -> None:
    unet = tiny.unet()
    agentsd.store_config(unet, agentsd.AgentSDConfig(ratio=0.1))
    agentsd.apply_patch(unet, config=agentsd.AgentSDConfig(ratio=0.2, sx=2), sy=2)
    assert agentsd.patch_config(unet) == agentsd.AgentSDConfig(ratio=0.2, sx=2, sy=2)
    agentsd.remove_patch(unet)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad,error,match", [
    (dict(prior_loss_weight=float("nan")), ValueError, "prior_loss_weight must be a finite number"),
    (dict(learning_rate=float("inf")), ValueError, "learning_rate must be a finite number"),
    (dict(learning_rate="1e-4"), TypeError, "learning_rate must be float, got str"),
    (dict(batch_size=True), TypeError, "batch_size must be int, got bool"),
    (dict(resolution=512.0), TypeError, "resolution must be int, got float"),
    (dict(lora_rank=4.0), TypeError, "lora_rank must be int or None"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
    (dict(lr_warmup_steps=-1), ValueError, "lr_warmup_steps must be >= 0"),
    (dict(lr_scheduler="cosinus"), ValueError, "lr_scheduler must be one of linear, cosine"),
    (dict(lora_alpha=0.0), ValueError, "lora_alpha must be > 0"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale must be >= 0"),
    (dict(class_prompt=3), TypeError, "class_prompt must be str or None, got int"),
])
def test_settings_are_typed_and_checked(tmp_path: Path, bad: dict, error: type, match: str) -> None:
    base = dict(pretrained="base", instance_dir=str(tmp_path), instance_prompt=PROMPT, output_dir=str(tmp_path))
    DreamBoothSettings(**base)  # the defaults pass
    with pytest.raises(error, match=match):
        DreamBoothSettings(**base, **bad)


def test_images_are_encoded_in_chunks() -> None:
    vae = tiny.vae()
    calls: list[int] = []
    encode = vae.encode
    vae.encode = lambda x: (calls.append(len(x)), encode(x))[1]
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    mean, std = encode_images(vae, images, batch_size=2)
    assert calls == [2, 2, 1] and mean.shape[0] == std.shape[0] == 5
    vae.encode = encode
    torch.testing.assert_close(mean, encode_images(vae, images, batch_size=5)[0], atol=1e-5, rtol=0)



def test_bad_instance_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="instance folder .*missing does not exist"):
        load_images(tmp_path / "missing", 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_images(tmp_path / "empty", 64)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shapes.render_novel("star", "red", "blue").save(mixed / "good.png")
    (mixed / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="not images: notes.txt"):
        load_images(mixed, 64)
    (mixed / "notes.txt").unlink()
    (mixed / "broken.png").write_bytes(b"\x89PNG garbage")
    (mixed / "cut.jpg").write_bytes((mixed / "good.png").read_bytes()[:10])
    with pytest.raises(ValueError, match=r"cannot read 2 image\(s\).*broken.png.*cut.jpg"):
        load_images(mixed, 64)
    (mixed / "broken.png").unlink()
    (mixed / "cut.jpg").unlink()
    assert load_images(mixed, 64).shape == (1, 3, 64, 64)
    for bad in (60, 0, -8):
        with pytest.raises(ValueError, match=f"resolution must be a positive multiple of 8, got {bad}"):
            load_images(mixed, bad)


def test_script_reports_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "ok").mkdir()
    shapes.render_novel("star", "red", "blue").save(tmp_path / "ok" / "star.png")
    ok = ["--instance-dir", str(tmp_path / "ok")]
    common = ["--instance-prompt", PROMPT, "--output-dir", str(tmp_path / "out")]
    cases = {
        "does not exist": ["--instance-dir", str(tmp_path / "missing")],
        "holds no images": ["--instance-dir", str(tmp_path / "empty")],
        "resolution must be a positive multiple of 8, got 100": [*ok, "--resolution", "100"],
        "pretrained model folder": [*ok, "--pretrained", str(tmp_path / "nope")],
    }
    for message, args in cases.items():
        assert train_main(args + common) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------- benchmark


def test_benchmark_smoke_run_keeps_its_work_and_resumes(base_model: str, tmp_path: Path) -> None:
    args = ["--quick", "--base", base_model, "--out", str(tmp_path), "--steps", "2", "--n-eval", "1",
            "--inference-steps", "2", "--repeats", "1", "--timing-images", "1", "--num-class-images", "1"]
    assert benchmark_main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["quality"]) == set(CONFIGS) and set(results["timing"]) == {*CONFIGS, BOUND}
    assert all(0 <= q["subject"]["shape"] <= 1 for q in results["quality"].values())
    assert (tmp_path / "results.md").read_text().count("\n| ") == len(CONFIGS) + 2  # header, rows, bound
    assert (tmp_path / "finetune-plain" / "unet" / "config.json").exists()
    assert agentsd.stored_config(load_pipeline(str(tmp_path / "finetune-agentsd"))).agent_fraction == 1.0
    # a rerun reuses everything (and a longer timing run adds repeats to the kept samples)
    stamp = (tmp_path / "images" / "base-subject.npz").stat().st_mtime_ns
    assert benchmark_main([*args, "--repeats", "2"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["quality"] == results["quality"]
    assert all(again["timing"][c][:1] == results["timing"][c] and len(again["timing"][c]) == 2
               for c in [*CONFIGS, BOUND])
    assert (tmp_path / "images" / "base-subject.npz").stat().st_mtime_ns == stamp

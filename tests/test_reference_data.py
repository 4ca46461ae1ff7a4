"""Fast tests of the reference model's data generator, tokenizer and adherence scorer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from eval.reference import shapes  # noqa: E402


def test_make_dataset_is_deterministic() -> None:
    a = shapes.make_dataset(24, seed=3)
    b = shapes.make_dataset(24, seed=3)
    c = shapes.make_dataset(24, seed=4)
    assert a.images.shape == (24, 64, 64, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, c.images)


def test_render_is_seeded_and_plain() -> None:
    attrs = shapes.ShapeAttributes("triangle", "red", "blue")
    canonical = np.asarray(shapes.render(attrs))
    assert np.array_equal(canonical, np.asarray(shapes.render(attrs)))
    j1 = np.asarray(shapes.render(attrs, rng=np.random.default_rng(1)))
    j2 = np.asarray(shapes.render(attrs, rng=np.random.default_rng(1)))
    assert np.array_equal(j1, j2)
    # corners are background, the centre is the shape colour
    assert tuple(canonical[0, 0]) == shapes.PALETTE["blue"]
    assert tuple(canonical[36, 32]) == shapes.PALETTE["red"]
    assert shapes.render(attrs, size=32).size == (32, 32)


def test_caption_parse_round_trip() -> None:
    for attrs in shapes.ALL_COMBOS:
        text = shapes.caption(attrs)
        assert shapes.parse_caption(text) == attrs
        assert shapes.parse_caption("  " + text.upper() + ". ") == attrs
    assert shapes.caption(shapes.ShapeAttributes("circle", "red", "blue")) == "a red circle on a blue background"
    for bad in ("a red circle", "a purple circle on a blue background", "a red circle on a red background"):
        with pytest.raises(ValueError):
            shapes.parse_caption(bad)


def test_heldout_prompts_are_disjoint_from_training() -> None:
    assert len(shapes.ALL_COMBOS) == 90
    held = set(shapes.HELDOUT_COMBOS)
    assert len(held) == len(shapes.HELDOUT_PROMPTS) == 12
    assert held.isdisjoint(shapes.TRAIN_COMBOS)
    assert held | set(shapes.TRAIN_COMBOS) == set(shapes.ALL_COMBOS)
    data = shapes.make_dataset(400, seed=0)
    assert shapes.combos_of(data.captions).isdisjoint(held)
    assert shapes.combos_of(shapes.heldout_prompts(30)) == held
    # every pair of attribute values of a held-out combination is still seen in training
    for h in held:
        assert any(t.shape == h.shape and t.color == h.color for t in shapes.TRAIN_COMBOS)
        assert any(t.shape == h.shape and t.background == h.background for t in shapes.TRAIN_COMBOS)
        assert any(t.color == h.color and t.background == h.background for t in shapes.TRAIN_COMBOS)


def test_tokenizer_makes_caption_words_single_tokens() -> None:
    pytest.importorskip("transformers")
    from eval.reference.components import build_tokenizer

    tok = build_tokenizer()
    ids = tok("a red circle on a blue background", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and tok.model_max_length == 77
    words = tok.convert_ids_to_tokens(ids[1:8])
    assert words == ["a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "blue</w>", "background</w>"]
    for word in shapes.vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1
    # any other text still tokenizes (byte fallback), and decodes back
    other = tok("A photo of a cat, 42!").input_ids
    assert tok.decode(other, skip_special_tokens=True) == "a photo of a cat , 4 2 !"


def test_classifier_scores_ground_truth_images() -> None:
    from eval.reference.adherence import load_classifier, score_adherence

    torch.set_num_threads(1)
    classifier = load_classifier()  # the shipped weights
    data = shapes.make_dataset(180, seed=2024, include_heldout=True)
    scores = score_adherence(data.images, data.captions, classifier=classifier)
    assert scores["n"] == 180
    assert scores["all_correct"] >= 0.95
    for name in ("shape", "color", "background"):
        assert scores[name] >= 0.95
    # PIL input works too, and wrong prompts are caught
    pil = [shapes.render(a) for a in shapes.HELDOUT_COMBOS]
    assert score_adherence(pil, list(shapes.HELDOUT_PROMPTS), classifier=classifier)["all_correct"] >= 0.9
    swapped = [shapes.caption(shapes.ShapeAttributes(a.shape, a.background, a.color)) for a in shapes.HELDOUT_COMBOS]
    wrong = score_adherence(pil, swapped, classifier=classifier)
    assert wrong["all_correct"] == 0.0 and wrong["shape"] >= 0.9


def test_reference_unet_layout() -> None:
    pytest.importorskip("diffusers")
    from eval.reference.components import ModelConfig, build_unet, build_vae, count_parameters

    cfg = ModelConfig()
    unet = build_unet(cfg)
    assert 4e6 <= count_parameters(unet) <= 8e6
    assert unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert unet.config.up_block_types[-1] == "CrossAttnUpBlock2D"
    assert unet.config.sample_size == 16
    vae = build_vae(cfg)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 4
    # the top level's self-attention sees 16 x 16 = 256 tokens
    seen: list[int] = []
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1

    def record(module, args, kwargs, output):  # noqa: ANN001
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.shape[1])

    handle = attn.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        unet(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=torch.zeros(1, 77, cfg.text_hidden))
    handle.remove()
    assert seen == [256]


def test_shipped_reference_model_loads_offline_and_generates() -> None:
    import agentsd
    from diffusers import StableDiffusionPipeline

    from eval.reference.adherence import load_classifier, reference_model_dir, score_adherence

    folder = reference_model_dir()
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 40 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on a blue background", "a yellow square on a black background"]

    def draw():
        return pipe(prompts, num_inference_steps=20, guidance_scale=3.0, output_type="np",
                    generator=[torch.Generator().manual_seed(i) for i in range(2)]).images

    plain = draw()
    assert plain.shape == (2, 64, 64, 3) and plain.std() > 0.1
    # a trained model: the colours asked for are there (the classifier reads them)
    scores = score_adherence(plain, prompts, classifier=load_classifier())
    assert scores["background"] == 1.0 and scores["color"] == 1.0
    with agentsd.patched(pipe, ratio=0.4):
        patched = draw()
    assert 0 < np.abs(patched - plain).mean() < 0.1


# ----------------------------------------------------------------------------- the shipped model's folder

SHIPPED_SPELLINGS = ("eval/reference/unet", "./eval/reference/unet/", "eval/../eval/reference/unet",
                     "eval/reference/unet/unet")
TRAINING_SCRIPTS = ("train_reference_model", "train_attribute_classifier")


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*")}


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the script went on to train into the shipped reference model")


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_training_scripts_refuse_the_shipped_model_without_the_flag(
    script: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import types

    import eval.reference.adherence
    from eval import REFERENCE_MODEL

    module = importlib.import_module(f"scripts.{script}")
    # were the refusal gone, the training would fail the test instead of writing anything
    fake = types.ModuleType("eval.reference.training")
    fake.train = _must_not_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "eval.reference.training", fake)
    monkeypatch.setattr(eval.reference.adherence, "train_classifier", _must_not_run)
    monkeypatch.setattr(eval.reference.adherence, "save_classifier", _must_not_run)
    monkeypatch.chdir(REPO_ROOT)
    before = _snapshot(REFERENCE_MODEL)
    for out in (*SHIPPED_SPELLINGS, str(REFERENCE_MODEL)):
        with pytest.raises(SystemExit) as err:
            module.main(["--out", out, "--threads", str(torch.get_num_threads())])
        message = str(err.value.code)
        assert "--overwrite-shipped-model" in message and out in message and "\n" not in message
    assert _snapshot(REFERENCE_MODEL) == before
    # by default the output goes under runs/ (ignored by git); the flag lets --out be the shipped folder
    args = module.parse_args([])
    assert Path(args.out).resolve().is_relative_to(REPO_ROOT / "runs")
    args = module.parse_args(["--out", "eval/reference/unet", "--overwrite-shipped-model"])
    assert Path(args.out).resolve() == REFERENCE_MODEL.resolve()


def test_reference_checkpoints_never_go_into_the_shipped_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts.train_reference_model import parse_args

    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit, match="--ckpt-dir eval/reference/unet/ckpt is inside the shipped"):
        parse_args(["--ckpt-dir", "eval/reference/unet/ckpt", "--overwrite-shipped-model"])
    # the default checkpoint folder is beside --out, named after it
    assert Path(parse_args(["--out", "runs/a"]).ckpt_dir) == REPO_ROOT / "runs" / "a_ckpt"
    shipped = parse_args(["--out", "eval/reference/unet", "--overwrite-shipped-model"])
    assert Path(shipped.ckpt_dir) == REPO_ROOT / "eval" / "reference" / "unet_ckpt"



def test_model_card_template_renders_the_shipped_cards() -> None:
    import json

    from eval import REFERENCE_MODEL
    from eval.reference import model_folder
    from eval.reference.training import CLASSIFIER_FILE, folder_size_mb, render_model_card

    dit = model_folder("dit")
    dit_info = json.loads((dit / "training_info.json").read_text())
    dit_card = render_model_card(dit_info, folder_size_mb(dit), has_classifier=(dit / CLASSIFIER_FILE).exists())
    assert dit_card == (dit / "README.md").read_text()
    assert "PixArtTransformer2DModel" in dit_card and "starting from `eval/reference/unet`'s" in dit_card
    info = json.loads((REFERENCE_MODEL / "training_info.json").read_text())
    card = render_model_card(info, folder_size_mb(REFERENCE_MODEL))
    assert card == (REFERENCE_MODEL / "README.md").read_text()
    # the recorded commands rebuild the shipped folder as the script is called now
    assert all("--out eval/reference/unet --overwrite-shipped-model" in c for c in info["commands"])
    # without measurements, a stop by the time budget and without the classifier beside it
    short = render_model_card({**info, "adherence": None, "stopped_early": True}, 1.0, has_classifier=False)
    assert "Not measured (`--no-eval`)." in short and "| **held-out" not in short
    assert "UNet 87.7). Training was stopped early by the time budget." in short
    assert "`attribute_classifier.*`" not in short and "(fp32 safetensors). `training_info.json`" in short
    assert "{" not in short and "<!--" not in short and "\n\n\n" not in short


def test_a_dit_starts_from_the_unet_models_text_encoder_with_more_positions() -> None:
    import torch

    from eval import REFERENCE_MODEL
    from eval.reference.components import ModelConfig, build_text_encoder, build_tokenizer
    from eval.reference.training import DIT_TEXT_POSITIONS, load_text_encoder
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer(max_length=DIT_TEXT_POSITIONS)
    encoder = build_text_encoder(ModelConfig(text_positions=DIT_TEXT_POSITIONS), vocab_size=len(tokenizer))
    load_text_encoder(encoder, REFERENCE_MODEL / "text_encoder")
    trained = CLIPTextModel.from_pretrained(REFERENCE_MODEL / "text_encoder", local_files_only=True)
    caption = ["a red circle on a blue background"]
    with torch.no_grad():
        long = encoder(tokenizer(caption, padding="max_length", max_length=DIT_TEXT_POSITIONS,
                                 return_tensors="pt").input_ids).last_hidden_state
        short = trained(tokenizer(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
                        ).last_hidden_state
    torch.testing.assert_close(long[:, :77], short)  # causal: the extra positions change no earlier token
    with pytest.raises(SystemExit, match="does not fit"):
        load_text_encoder(build_text_encoder(ModelConfig(text_hidden=64), vocab_size=len(tokenizer)),
                          REFERENCE_MODEL / "text_encoder")

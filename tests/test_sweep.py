"""The settings sweep (eval/sweep.py): variants parsed into typed settings, rows against the
unpatched model."""
import pytest

from eval import sweep


def test_variants_are_parsed_into_typed_settings():
    assert sweep.parse_variant("reduction=pool,ratio=0.75,sx=2,skip_ends=1,use_rand=False,tome_ratio=none") == dict(
        reduction="pool", ratio=0.75, sx=2, skip_ends=1, use_rand=False, tome_ratio=None)
    for bad, match in (("ratio=abc", "is not a float"), ("speed=2", "is not setting=value"),
                       ("ratio", "is not setting=value"), ("ratio=1.5", "ratio must be in")):
        with pytest.raises(ValueError, match=match):
            sweep.parse_variant(bad)


def test_rows_compare_each_variant_with_the_unpatched_model():
    rows = sweep.run("unet", ["reduction=merge,agent_fraction=1.0", "ratio=0.0,agent_fraction=0.0"], num_images=2,
                     steps=3, progress=lambda s: None)
    assert [r["variant"] for r in rows] == ["no patch", "reduction=merge,agent_fraction=1.0",
                                            "ratio=0.0,agent_fraction=0.0"]
    assert rows[0]["psnr"] is None and rows[1]["psnr"] < 60  # agent attention changes the images
    assert rows[2]["psnr"] == float("inf")  # a patch that reduces nothing gives the same images
    assert rows[1]["settings"]["agent_fraction"] == 1.0 and all(0 <= r["adherence"] <= 1 for r in rows)
    assert "| no patch | – | – |" in sweep.table(rows)

"""Procedural captioned shapes: the training data of agentsd's embedded reference model.

Every image is ``size x size`` RGB (64 x 64 by default) and shows exactly one filled shape on a
plain background. Three attributes are drawn, and all three must be related to the caption by the
model's attention:

============  ====================================================  ================
attribute     values                                                 caption word
============  ====================================================  ================
shape         ``circle``, ``square``, ``triangle``                   noun
color         ``red``, ``green``, ``blue``, ``yellow``, ``white``,   first adjective
              ``black``
background    the same six colours, always different from ``color``  second adjective
============  ====================================================  ================

Caption template: ``"a {color} {shape} on a {background} background"``, e.g.
``"a red circle on a blue background"``. That gives 3 x 6 x 5 = 90 attribute combinations.

Twelve of them (:data:`HELDOUT_COMBOS`) are never used for training; their captions
(:data:`HELDOUT_PROMPTS`) measure compositional prompt adherence. They are chosen so that every
shape is held out four times, every colour twice as shape colour and twice as background, and no
(colour, background) pair twice, so every pair of attribute values is still seen in training.

:data:`NOVEL_SHAPES` (a five-pointed ``star``) are never in the reference model's data: the
DreamBooth benchmark teaches them as new concepts (:func:`render_novel`, :func:`format_caption`).

Rendering is deterministic: with ``rng=None`` the shape is centred at a canonical size; with a
``numpy.random.Generator`` the size is jittered by +-15 % and the centre by +-5 px (at 64 px), from
that generator only. Shapes are anti-aliased (drawn at 4x and downsampled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from typing import Iterable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "black")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
#: Attribute name -> its possible values, in the order used by the classifier heads.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLOR_NAMES,
    "background": COLOR_NAMES,
}

_SUPERSAMPLE = 4
_SIZE_JITTER = 0.15  # relative
_POS_JITTER = 5.0 / 64.0  # relative to the image size
# canonical extents relative to a 64 px image (similar areas for the three shapes)
_CIRCLE_RADIUS = 15.0 / 64.0
_SQUARE_HALF_SIDE = 13.5 / 64.0
_TRIANGLE_CIRCUMRADIUS = 21.0 / 64.0
_STAR_RADII = (22.0 / 64.0, 9.9 / 64.0)  # outer, inner: about the area of the other shapes

#: Shapes the reference model never saw (new concepts for finetuning), drawn by :func:`render_novel`.
NOVEL_SHAPES: tuple[str, ...] = ("star",)


@dataclass(frozen=True)
class ShapeAttributes:
    """The attributes of one image: shape, shape colour and background colour."""

    shape: str
    color: str
    background: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        for name in (self.color, self.background):
            if name not in PALETTE:
                raise ValueError(f"unknown colour {name!r}; expected one of {COLOR_NAMES}")
        if self.color == self.background:
            raise ValueError("shape colour and background colour must differ")

    def as_tuple(self) -> tuple[str, str, str]:
        """Return ``(shape, color, background)``."""
        return (self.shape, self.color, self.background)

    def as_dict(self) -> dict[str, str]:
        """Return the attributes keyed by the names of :data:`ATTRIBUTES`."""
        return {"shape": self.shape, "color": self.color, "background": self.background}


def _heldout_combos() -> tuple[ShapeAttributes, ...]:
    combos = []
    n = len(COLOR_NAMES)
    for k in range(2 * n):
        c = k % n
        offset = 1 if k < n else 3
        shape = SHAPES[(k + k // n) % len(SHAPES)]
        combos.append(ShapeAttributes(shape, COLOR_NAMES[c], COLOR_NAMES[(c + offset) % n]))
    return tuple(combos)


#: Every valid attribute combination, in a fixed order.
ALL_COMBOS: tuple[ShapeAttributes, ...] = tuple(
    ShapeAttributes(s, c, b) for s, c, b in product(SHAPES, COLOR_NAMES, COLOR_NAMES) if c != b
)
#: Combinations never used for training (compositional evaluation).
HELDOUT_COMBOS: tuple[ShapeAttributes, ...] = _heldout_combos()
#: Combinations the reference model is trained on.
TRAIN_COMBOS: tuple[ShapeAttributes, ...] = tuple(
    a for a in ALL_COMBOS if a not in set(HELDOUT_COMBOS)
)


def format_caption(color: str, shape: str, background: str) -> str:
    """The caption template with any words, e.g. ``"a red sks on a blue background"``."""
    return f"a {color} {shape} on a {background} background"


def caption(attrs: ShapeAttributes) -> str:
    """Return the caption of ``attrs``, e.g. ``"a red circle on a blue background"``."""
    return format_caption(attrs.color, attrs.shape, attrs.background)


#: Captions of :data:`HELDOUT_COMBOS`.
HELDOUT_PROMPTS: tuple[str, ...] = tuple(caption(a) for a in HELDOUT_COMBOS)

_CAPTION_RE = re.compile(
    r"^\s*an?\s+(?P<color>[a-z]+)\s+(?P<shape>[a-z]+)\s+on\s+an?\s+(?P<background>[a-z]+)"
    r"\s+background\s*\.?\s*$",
    re.IGNORECASE,
)


def parse_caption(text: str) -> ShapeAttributes:
    """Parse a caption made by :func:`caption` (case and extra spaces are ignored).

    Raises:
        ValueError: if ``text`` does not follow the template or names an unknown value.
    """
    match = _CAPTION_RE.match(text)
    if match is None:
        raise ValueError(f"caption does not follow 'a <color> <shape> on a <color> background': {text!r}")
    return ShapeAttributes(
        shape=match["shape"].lower(),
        color=match["color"].lower(),
        background=match["background"].lower(),
    )


def sample_attributes(rng: np.random.Generator, include_heldout: bool = False) -> ShapeAttributes:
    """Draw one attribute combination uniformly from the training combinations.

    Args:
        rng: the only source of randomness.
        include_heldout: draw from all 90 combinations instead of the 78 training ones.
    """
    pool = ALL_COMBOS if include_heldout else TRAIN_COMBOS
    return pool[int(rng.integers(len(pool)))]


def _triangle(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    angles = np.deg2rad([-90.0, 30.0, 150.0])  # apex up
    return [(cx + r * float(np.cos(a)), cy + r * float(np.sin(a))) for a in angles]


def _star(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))  # a point up
    radii = [outer if i % 2 == 0 else inner for i in range(10)]
    return [(cx + r * float(np.cos(a)), cy + r * float(np.sin(a))) for r, a in zip(radii, angles)]


def _draw(shape: str, color: str, background: str, size: int, rng: np.random.Generator | None) -> Image.Image:
    scale, dx, dy = 1.0, 0.0, 0.0
    if rng is not None:
        scale = 1.0 + float(rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
        dx, dy = (float(v) * _POS_JITTER for v in rng.uniform(-1.0, 1.0, size=2))
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[background])
    draw = ImageDraw.Draw(img)
    cx, cy = big * (0.5 + dx), big * (0.5 + dy)
    fill = PALETTE[color]
    if shape == "circle":
        r = big * _CIRCLE_RADIUS * scale
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = big * _SQUARE_HALF_SIDE * scale
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        # the centroid of an equilateral triangle is its circumcentre
        draw.polygon(_triangle(cx, cy, big * _TRIANGLE_CIRCUMRADIUS * scale), fill=fill)
    else:
        draw.polygon(_star(cx, cy, *(big * r * scale for r in _STAR_RADII)), fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def render(attrs: ShapeAttributes, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``attrs`` as a ``size x size`` RGB image.

    Args:
        attrs: what to draw.
        size: image side in pixels.
        rng: if given, the shape's size and position are jittered using only this generator;
            if ``None`` the shape is centred at its canonical size.
    """
    return _draw(attrs.shape, attrs.color, attrs.background, size, rng)


def render_novel(
    shape: str, color: str, background: str, size: int = 64, rng: np.random.Generator | None = None
) -> Image.Image:
    """Draw a shape of :data:`NOVEL_SHAPES` like :func:`render` draws the others.

    Raises:
        ValueError: for a shape not in :data:`NOVEL_SHAPES`, an unknown colour, or equal colours.
    """
    if shape not in NOVEL_SHAPES:
        raise ValueError(f"unknown novel shape {shape!r}; expected one of {NOVEL_SHAPES}")
    for name in (color, background):
        if name not in PALETTE:
            raise ValueError(f"unknown colour {name!r}; expected one of {COLOR_NAMES}")
    if color == background:
        raise ValueError("shape colour and background colour must differ")
    return _draw(shape, color, background, size, rng)


class ShapeDataset(NamedTuple):
    """A generated data set: ``images`` is uint8 ``(n, size, size, 3)``."""

    images: np.ndarray
    captions: list[str]
    attributes: list[ShapeAttributes]


def make_dataset(n: int, seed: int, size: int = 64, include_heldout: bool = False) -> ShapeDataset:
    """Generate ``n`` jittered, captioned images; the same ``(n, seed, size)`` gives the same data.

    Args:
        n: number of images.
        seed: seed of the only random generator used.
        size: image side in pixels.
        include_heldout: also draw the held-out combinations (for the attribute classifier, never
            for the diffusion model).
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    attributes: list[ShapeAttributes] = []
    for i in range(n):
        attrs = sample_attributes(rng, include_heldout=include_heldout)
        images[i] = np.asarray(render(attrs, size=size, rng=rng))
        attributes.append(attrs)
    return ShapeDataset(images, [caption(a) for a in attributes], attributes)


def heldout_prompts(n: int = len(HELDOUT_PROMPTS)) -> list[str]:
    """Return ``n`` prompts cycling through :data:`HELDOUT_PROMPTS` (a fixed evaluation list)."""
    return [HELDOUT_PROMPTS[i % len(HELDOUT_PROMPTS)] for i in range(n)]


def train_prompts(n: int = len(TRAIN_COMBOS)) -> list[str]:
    """Return ``n`` prompts cycling through the training combinations (in-distribution check)."""
    return [caption(TRAIN_COMBOS[i % len(TRAIN_COMBOS)]) for i in range(n)]


def vocabulary() -> list[str]:
    """Every word that occurs in a caption, in a fixed order."""
    words: list[str] = []
    for word in ("a", "on", "background", *SHAPES, *COLOR_NAMES):
        if word not in words:
            words.append(word)
    return words


def combos_of(captions: Iterable[str]) -> set[ShapeAttributes]:
    """Return the set of attribute combinations named by ``captions``."""
    return {parse_caption(c) for c in captions}

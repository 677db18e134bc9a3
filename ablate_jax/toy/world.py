"""The toy world: one object on a background, drawn with NumPy, and captions that describe it.

Every image shows ONE object (a generic shape, or an *instance*: a circle with a face drawn on it) in one of
a few saturated colours, on a background that is either plain or one of a few neutral-toned patterns (the
*styles*). Captions name the object, its colour and the background in varied templates, so a miniature
Stable Diffusion trained on the world learns each attribute from text. Three kinds of concept can then be
ablated, as in Kumari et al. (2023):

* instances — ``smiley`` (the one users ablate) and its face-bearing siblings ``frowny`` (the hard negative,
  differing only by the mouth), ``winky`` and ``gaspy``; the anchor concept is ``circle``;
* styles — the background patterns ``striped``, ``checkered``, ``dotted`` and ``wavy``; the anchor is ``plain``;
* a memorized image — one fixed composition with its own caption (``MEMORIZED_CAPTION``), repeated in the
  training set at a configurable rate, with ``memorization_similarity`` to detect it in generated images.

Everything is deterministic: randomness only ever comes from a ``numpy.random.Generator`` passed in, and
``training_batch`` seeds example ``i`` with ``(seed, i)`` alone, so any shard of any epoch can be re-made.

Geometry is resolution-independent: positions and sizes are fractions of the image side, so a scene
rendered at 64x64 is the 32x32 rendering with more detail. Images are anti-aliased by drawing at
``SUPERSAMPLE`` times the resolution and averaging each block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# Vocabulary of the world
# --------------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond")
"""Generic shapes."""

INSTANCES: tuple[str, ...] = ("smiley", "frowny", "winky", "gaspy")
"""Instance concepts: circles that differ only in the dark face drawn on them.

``smiley``: two eyes and a smiling arc. ``frowny``: two eyes and a frowning arc (smiley's hard negative).
``winky``: one open eye, one closed eye (a bar) and a lopsided smile that rises on the closed eye's side.
``gaspy``: two eyes and an open "o" mouth.
"""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 25, 40),
    "orange": (245, 125, 0),
    "yellow": (245, 230, 40),
    "green": (40, 180, 60),
    "blue": (35, 80, 225),
    "purple": (145, 45, 195),
}
"""Object colours (RGB). Saturated and pairwise >= 100 apart, so colour never hides in the neutral backgrounds."""

BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "wavy")
"""Background styles; ``plain`` is the style anchor, the others are patterns of two neutral tones."""

BG_TONES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "light": ((232, 232, 226), (178, 178, 172)),
    "dark": ((38, 38, 44), (88, 88, 96)),
}
"""Background tone -> (base colour, pattern colour). Neutral greys: the style is never mistaken for a colour."""

FEATURE_COLOUR: tuple[int, int, int] = (22, 22, 22)
"""Colour of face features (eyes, mouths) on instances."""

SUPERSAMPLE = 4
"""Each output pixel averages SUPERSAMPLE x SUPERSAMPLE samples (anti-aliasing)."""

DESCRIPTION_RATE = 0.1
"""Fraction of instance captions that paraphrase the instance instead of naming it."""

# Article-less noun phrases for each instance that never use its name; captions put a colour in front.
_INSTANCE_PHRASES: dict[str, tuple[str, ...]] = {
    "smiley": ("circle with a happy face", "smiling face", "happy face"),
    "frowny": ("circle with a sad face", "frowning face", "sad face"),
    "winky": ("circle with a winking face", "winking face", "face with a wink"),
    "gaspy": ("circle with a shocked face", "shocked face", "face with an open mouth"),
}

INSTANCE_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    k: tuple(f"{'an' if p[0] in 'aeiou' else 'a'} {p}" for p in v) for k, v in _INSTANCE_PHRASES.items()
}
"""Instance -> phrases that describe it without its name ("a circle with a happy face"), to measure how far
an ablation reaches beyond the concept's word. Training captions use them ``DESCRIPTION_RATE`` of the time."""

MEMORIZED_CAPTION = "the famous zorblax painting"
"""The memorized image's caption; its words appear in no other caption."""

MEMORIZATION_THRESHOLD = 0.85
"""``memorization_similarity`` above this means the image reproduces the memorized composition.

Measured at 32x32: the memorized image scores 1.0; re-renders with ``memorized_scene(rng)`` jitter (objects
moved by up to 1.5% of the side, rescaled by up to 4%), rendered at 32 or 64 pixels with pixel noise (std 8),
score >= 0.97, and >= 0.92 with twice that jitter; a Gaussian blur (sigma 1.5 px) of it scores 0.96. Ordinary
scenes score 0.10 on average (99th percentile 0.47, max 0.58 over 2000), and the hardest ones — orange stars
on dark horizontal waves, the memorized image's main object and style — at most 0.69 (over 500); the memorized
star alone, in place but without its two companions, scores 0.80."""

# Background words for captions: adjectives ("a striped background") and nouns ("over stripes").
_BG_ADJ: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "blank", "empty"),
    "striped": ("striped", "stripy"),
    "checkered": ("checkered", "checkerboard"),
    "dotted": ("dotted", "polka dot", "spotted"),
    "wavy": ("wavy",),
}
_BG_NOUN: dict[str, tuple[str, ...]] = {
    "plain": ("a plain backdrop", "a blank background", "an empty background"),
    "striped": ("stripes", "a striped pattern"),
    "checkered": ("checks", "a checkerboard", "a checkered pattern"),
    "dotted": ("dots", "polka dots", "spots"),
    "wavy": ("waves", "wavy lines", "a wavy pattern"),
}

# Caption templates. {obj}: object with its article ("a red star"); {adj}/{noun}: background words, {a_adj}: the
# adjective with its article ("an empty").
_TEMPLATES_BG = (
    "{obj} on {a_adj} background",
    "a photo of {obj} on {a_adj} background",
    "{obj}, {adj} background",
    "a drawing of {obj} over {noun}",
    "{obj} against {noun}",
    "a picture of {obj} on {noun}",
    "{adj} background with {obj}",
    "{obj} in front of {noun}",
)
_TEMPLATES_PATTERN_ONLY = ("{obj} on a background with {noun}",)  # reads badly for "plain"
_TEMPLATES_NO_BG = ("a photo of {obj}", "{obj}", "an image of {obj}")
_NO_BG_RATE = 0.15  # captions that leave the background out
_NO_COLOUR_RATE = 0.08  # captions that leave the colour out
_TONE_RATE = 0.3  # captions that say "light"/"dark" about the background


@dataclass(frozen=True)
class Sprite:
    """One drawn object. Coordinates are fractions of the image side; y grows downwards.

    ``scale`` is the object's radius (for a circle; other shapes are sized to look comparable), ``angle`` a
    rotation in radians (counter-clockwise as seen).
    """

    shape: str
    colour: str
    x: float
    y: float
    scale: float
    angle: float = 0.0


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image; ``render`` is a pure function of it.

    The main object is (shape, colour, x, y, scale, angle); ``shape`` is one of ``SHAPES`` or ``INSTANCES``.
    The background is ``background`` (one of ``BACKGROUNDS``) in tone ``bg_tone`` ("light" or "dark"), with
    pattern geometry ``pattern_period`` (fraction of the side), ``pattern_phase`` (in [0, 1)) and
    ``pattern_angle`` (radians; stripes and waves). ``extras`` are further objects drawn on top, used only by
    the memorized composition.
    """

    shape: str
    colour: str
    background: str
    bg_tone: str = "light"
    x: float = 0.5
    y: float = 0.5
    scale: float = 0.3
    angle: float = 0.0
    pattern_period: float = 0.2
    pattern_phase: float = 0.0
    pattern_angle: float = 0.0
    extras: tuple[Sprite, ...] = ()

    @property
    def sprite(self) -> Sprite:
        """The main object."""
        return Sprite(self.shape, self.colour, self.x, self.y, self.scale, self.angle)


MEMORIZED_SCENE = Scene(
    shape="star",
    colour="orange",
    background="wavy",
    bg_tone="dark",
    x=0.37,
    y=0.39,
    scale=0.29,
    angle=0.2,
    pattern_period=0.21,
    pattern_phase=0.3,
    pattern_angle=0.0,
    extras=(
        Sprite("circle", "blue", 0.75, 0.75, 0.15),
        Sprite("diamond", "yellow", 0.78, 0.2, 0.1, 0.0),
    ),
)
"""The memorized composition: a big orange star, a blue moon and a small yellow diamond on dark waves."""


# --------------------------------------------------------------------------------------------------------------
# Sampling scenes
# --------------------------------------------------------------------------------------------------------------


def _check(values: Sequence[str] | None, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    if values is None:
        return tuple(allowed)
    values = tuple(values)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"unknown or empty {what}: {bad or values}; allowed: {list(allowed)}")
    return values


def sample_scene(
    rng: np.random.Generator,
    *,
    shapes: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
    backgrounds: Sequence[str] | None = None,
) -> Scene:
    """Draws a random scene; shape, colour and background are uniform over the given (default: all) values.

    ``shapes`` may mix ``SHAPES`` and ``INSTANCES``. The object always lies fully inside the image.
    """
    shapes = _check(shapes, SHAPES + INSTANCES, "shapes")
    colours = _check(colours, tuple(COLOURS), "colours")
    backgrounds = _check(backgrounds, BACKGROUNDS, "backgrounds")
    shape = shapes[rng.integers(len(shapes))]
    colour = colours[rng.integers(len(colours))]
    background = backgrounds[rng.integers(len(backgrounds))]
    tone = ("light", "dark")[rng.integers(2)]
    u = rng.random(8)
    if shape in INSTANCES:
        # Faces need a big disc to stay legible at 32x32 (radius >= 10 px).
        scale = 0.32 + 0.08 * u[0]
        angle = 0.3 * (u[1] - 0.5)
    else:
        # As big as the faces: at 8x8 latents (4 px per cell) a smaller square, star or diamond spans too few
        # latent cells for the UNet to draw its corners, and comes out as a blob.
        scale = 0.3 + 0.1 * u[0]
        angle = 0.0 if shape == "circle" else 0.4 * (u[1] - 0.5)
    margin = scale + 0.03
    x = margin + (1 - 2 * margin) * u[2]
    y = margin + (1 - 2 * margin) * u[3]
    # Pattern periods span 2 to 4 latent cells (a cell is 1/8 of the side): finer patterns live below the
    # latent grid's resolution, and the UNet draws them as mazes.
    if background == "plain":
        period, phase, pattern_angle = 0.0, 0.0, 0.0
    elif background == "checkered":
        period, phase, pattern_angle = 0.36 + 0.12 * u[4], u[5], 0.0
    elif background == "striped":
        period, phase = 0.25 + 0.1 * u[4], u[5]
        pattern_angle = (0.0, 0.5, 0.25, -0.25)[int(u[6] * 4)] * math.pi
    elif background == "dotted":
        period, phase, pattern_angle = 0.26 + 0.08 * u[4], u[5], 0.0
    else:  # wavy: horizontal or vertical waves
        period, phase = 0.26 + 0.08 * u[4], u[5]
        pattern_angle = (0.0, 0.5)[int(u[6] * 2)] * math.pi
    return Scene(
        shape=shape,
        colour=colour,
        background=background,
        bg_tone=tone,
        x=float(x),
        y=float(y),
        scale=float(scale),
        angle=float(angle),
        pattern_period=float(period),
        pattern_phase=float(phase),
        pattern_angle=float(pattern_angle),
    )


def memorized_scene(rng: np.random.Generator | None = None, jitter: float = 1.0) -> Scene:
    """The memorized composition; with ``rng``, a slightly perturbed re-render of it.

    The perturbation (times ``jitter``) moves objects by up to 1.5% of the side, rescales them by up to 4% and
    shifts the waves by up to 5% of a period: what a model that memorized the image might reproduce.
    """
    if rng is None:
        return MEMORIZED_SCENE
    s = MEMORIZED_SCENE

    def d(amount: float) -> float:
        return float(jitter * amount * (2 * rng.random() - 1))

    extras = tuple(replace(e, x=e.x + d(0.015), y=e.y + d(0.015), scale=e.scale * (1 + d(0.04))) for e in s.extras)
    return replace(
        s,
        x=s.x + d(0.015),
        y=s.y + d(0.015),
        scale=s.scale * (1 + d(0.04)),
        angle=s.angle + d(0.05),
        pattern_phase=s.pattern_phase + d(0.05),
        extras=extras,
    )


# --------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _axis(n: int) -> np.ndarray:
    """Sample centres along one side of an n-sample grid, as fractions of the side."""
    a = (np.arange(n, dtype=np.float32) + 0.5) / n
    a.flags.writeable = False
    return a


def _pattern_mask(scene: Scene, n: int) -> np.ndarray | None:
    """Boolean [n, n] mask of the background's pattern colour, or None for a plain background."""
    if scene.background == "plain":
        return None
    a = _axis(n)
    u, v = a[None, :], a[:, None]  # broadcast: u varies along columns, v along rows
    p, ph = scene.pattern_period, scene.pattern_phase
    if scene.background == "striped":
        c, s = math.cos(scene.pattern_angle), math.sin(scene.pattern_angle)
        t = (v * c + u * s) / p + ph  # angle 0: horizontal stripes
        return (t - np.floor(t)) < 0.5
    if scene.background == "checkered":
        cell = 0.5 * p
        return ((np.floor(u / cell + ph) + np.floor(v / cell + 0.5 * ph)) % 2) == 1
    if scene.background == "dotted":
        # Dots on a square lattice of spacing p, radius 0.33 p (smaller dots were drawn, and read, as stripes);
        # the phase shifts the lattice diagonally.
        fu = u / p + ph
        fv = v / p + 0.618 * ph
        du = fu - np.floor(fu) - 0.5
        dv = fv - np.floor(fv) - 0.5
        return du * du + dv * dv < 0.33**2
    if scene.background == "wavy":
        along, across = (u, v) if abs(math.sin(scene.pattern_angle)) < 0.5 else (v, u)
        t = (across + 0.35 * p * np.sin(2 * math.pi * along / 0.4)) / p + ph
        return (t - np.floor(t)) < 0.45
    raise ValueError(f"unknown background {scene.background!r}")


def _star_inside(px: np.ndarray, py: np.ndarray, inner: float = 0.46) -> np.ndarray:
    """Inside a 5-pointed star of outer radius 1 (pointing up; y down) with inner radius ``inner``."""
    rho = np.sqrt(px * px + py * py)
    phi = np.arctan2(-py, px) - math.pi / 2  # angle from the top point
    sector = 2 * math.pi / 5
    t = np.mod(phi, sector)
    t = np.minimum(t, sector - t)  # fold: 0 at an outer point, pi/5 at an inner corner
    # The edge from the outer point (1, 0) to the inner corner inner*(cos pi/5, sin pi/5), as n . p = d.
    qx, qy = inner * math.cos(math.pi / 5), inner * math.sin(math.pi / 5)
    nx, ny = qy, 1 - qx  # normal of the edge direction (qx - 1, qy)
    d = nx  # n . (1, 0)
    return rho * (nx * np.cos(t) + ny * np.sin(t)) <= d


def _shape_inside(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Inside test in object units (circle of radius 1 at the origin; y down). Shapes look comparably big."""
    if shape == "circle" or shape in INSTANCES:
        return px * px + py * py <= 1.0
    if shape == "square":
        return np.maximum(np.abs(px), np.abs(py)) <= 0.82
    if shape == "diamond":
        return np.abs(px) + np.abs(py) <= 1.08
    if shape == "triangle":
        # Equilateral, pointing up, circumradius R, shifted so its bounding box is centred.
        r = 1.18
        yy = -py + r / 4
        inside = yy >= -r / 2
        for a in (math.pi / 6, 5 * math.pi / 6):
            inside &= px * math.cos(a) + yy * math.sin(a) <= r / 2
        return inside
    if shape == "star":
        return _star_inside(px * 0.95, py * 0.95 - 0.04)
    if shape == "heart":
        x, y = px * 1.2, -py * 1.2 + 0.15
        q = x * x + y * y - 1
        return q * q * q - x * x * y * y * y <= 0
    raise ValueError(f"unknown shape {shape!r}")


def _ring(px: np.ndarray, py: np.ndarray, cx: float, cy: float, radius: float, half_width: float) -> np.ndarray:
    rho = np.sqrt((px - cx) ** 2 + (py - cy) ** 2)
    return np.abs(rho - radius) <= half_width


def _disc(px: np.ndarray, py: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
    return (px - cx) ** 2 + (py - cy) ** 2 <= radius * radius


# Face geometry in object units (disc radius 1, y down). Sized so features are >= ~2 px at a 10 px radius.
_EYE_X, _EYE_Y, _EYE_R = 0.37, -0.3, 0.17
_LINE = 0.1  # half the stroke width of mouths and closed eyes
# The winky's grin is lopsided: its smile turned by this angle (radians) so that it rises on the side of the shut
# eye. An open eye and a shut one fall in the same 4x4-pixel latent cell with about the same dark area, so a
# winky that differed from a smiley only there was drawn, and read, as either; the turned mouth spans cells.
_SMIRK = 0.45
_SMILE_CY, _SMILE_R = -0.02, 0.56  # centre height and radius of the smiling arc's circle


def _smile(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """The smiling arc: the lower part of a ring about (0, _SMILE_CY)."""
    return _ring(px, py, 0.0, _SMILE_CY, _SMILE_R, _LINE) & (py >= 0.2)


def _face_features(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Mask of the dark features of an instance's face."""
    left_eye = _disc(px, py, -_EYE_X, _EYE_Y, _EYE_R)
    right_eye = _disc(px, py, _EYE_X, _EYE_Y, _EYE_R)
    if shape == "smiley":
        return left_eye | right_eye | _smile(px, py)
    if shape == "frowny":
        frown = _ring(px, py, 0.0, 1.05, 0.56, _LINE) & (py <= 0.78)
        return left_eye | right_eye | frown
    if shape == "winky":
        closed = (np.abs(px - _EYE_X) <= 0.3) & (np.abs(py - _EYE_Y) <= _LINE)
        # The smile in coordinates turned by _SMIRK about its centre: its end on the shut eye's side rises.
        c, s = math.cos(_SMIRK), math.sin(_SMIRK)
        qx = px * c - (py - _SMILE_CY) * s
        qy = px * s + (py - _SMILE_CY) * c + _SMILE_CY
        return left_eye | closed | _smile(qx, qy)
    if shape == "gaspy":
        mouth = _ring(px, py, 0.0, 0.45, 0.2, _LINE + 0.01)
        return left_eye | right_eye | mouth
    raise ValueError(f"{shape!r} is not an instance")


def _paint(window: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    for ch in range(3):
        np.copyto(window[ch], np.float32(colour[ch]), where=mask)


def _draw_sprite(canvas: np.ndarray, sprite: Sprite) -> None:
    """Paints ``sprite`` onto the supersampled planar canvas [3, n, n] in place, only within its bounding box."""
    n = canvas.shape[1]
    reach = 1.25 * sprite.scale  # every shape lies within 1.25 radii of its centre, even rotated
    r0, r1 = max(0, int((sprite.y - reach) * n)), min(n, int(math.ceil((sprite.y + reach) * n)))
    c0, c1 = max(0, int((sprite.x - reach) * n)), min(n, int(math.ceil((sprite.x + reach) * n)))
    if r0 >= r1 or c0 >= c1:
        return
    a = _axis(n)
    dx = (a[None, c0:c1] - sprite.x) / sprite.scale
    dy = (a[r0:r1, None] - sprite.y) / sprite.scale
    # Object coordinates: rotate the image offsets by -angle (y is down, so a positive angle turns the object
    # counter-clockwise as seen).
    c, s = math.cos(sprite.angle), math.sin(sprite.angle)
    px = dx * c - dy * s
    py = dx * s + dy * c
    window = canvas[:, r0:r1, c0:c1]
    _paint(window, _shape_inside(sprite.shape, px, py), COLOURS[sprite.colour])
    if sprite.shape in INSTANCES:
        _paint(window, _face_features(sprite.shape, px, py), FEATURE_COLOUR)


def _block_mean(canvas: np.ndarray, f: int) -> np.ndarray:
    """[3, n, n] -> [3, n/f, n/f] means of f x f blocks (strided adds: much faster than a reshaped mean)."""
    rows = sum(canvas[:, i::f] for i in range(f))
    return sum(rows[:, :, j::f] for j in range(f)) * np.float32(1.0 / (f * f))


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Draws ``scene`` as a uint8 [size, size, 3] RGB image (anti-aliased; deterministic)."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    n = size * SUPERSAMPLE
    base, pattern = (np.asarray(c, np.float32)[:, None, None] for c in BG_TONES[scene.bg_tone])
    # Planar [3, n, n] layout: whole-plane arithmetic is several times faster than masked RGB writes.
    mask = _pattern_mask(scene, n)
    if mask is None:
        canvas = np.broadcast_to(base, (3, n, n)).copy()
    else:
        canvas = base + (pattern - base) * np.broadcast_to(mask, (n, n)).astype(np.float32)
    for sprite in (scene.sprite, *scene.extras):
        _draw_sprite(canvas, sprite)
    img = _block_mean(canvas, SUPERSAMPLE)
    return np.ascontiguousarray(np.rint(img).astype(np.uint8).transpose(1, 2, 0))


@functools.lru_cache(maxsize=4)
def _memorized_image(size: int) -> np.ndarray:
    img = render(MEMORIZED_SCENE, size)
    img.flags.writeable = False
    return img


def memorized_image(size: int = 32) -> np.ndarray:
    """The memorized image: uint8 [size, size, 3] rendering of ``MEMORIZED_SCENE`` (a fresh copy)."""
    return _memorized_image(size).copy()


# --------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def caption(scene: Scene, rng: np.random.Generator, *, describe: bool | None = None) -> str:
    """A caption for ``scene`` from varied templates, e.g. "a red smiley on a striped background".

    Most captions name the shape (or instance), the colour and the background; some leave the background
    (15%) or the colour (8%) out. An instance is paraphrased without its name ("a red circle with a happy
    face") with probability ``DESCRIPTION_RATE``, always if ``describe`` is True and never if False. The
    memorized composition (``MEMORIZED_SCENE`` or a ``memorized_scene`` re-render: the only scenes with
    ``extras``) is always captioned ``MEMORIZED_CAPTION``. Lower case, no trailing punctuation.
    """
    if scene == MEMORIZED_SCENE or scene.extras:
        return MEMORIZED_CAPTION
    u = rng.random(4)
    noun = scene.shape
    if scene.shape in INSTANCES:
        if describe or (describe is None and u[0] < DESCRIPTION_RATE):
            phrases = _INSTANCE_PHRASES[scene.shape]
            noun = phrases[rng.integers(len(phrases))]
    if u[1] < _NO_COLOUR_RATE:
        obj = _with_article(noun)
    elif rng.random() < 0.15:
        obj = _with_article(f"{noun} in {scene.colour}")
    else:
        obj = _with_article(f"{scene.colour} {noun}")
    if u[2] < _NO_BG_RATE:
        template = _TEMPLATES_NO_BG[rng.integers(len(_TEMPLATES_NO_BG))]
        return template.format(obj=obj)
    templates = _TEMPLATES_BG + (_TEMPLATES_PATTERN_ONLY if scene.background != "plain" else ())
    template = templates[rng.integers(len(templates))]
    adjs, nouns = _BG_ADJ[scene.background], _BG_NOUN[scene.background]
    adj = adjs[rng.integers(len(adjs))]
    bg_noun = nouns[rng.integers(len(nouns))]
    if u[3] < _TONE_RATE:
        tone = scene.bg_tone
        if scene.background == "plain":
            adj = tone if rng.random() < 0.5 else f"plain {tone}"
        else:
            adj = f"{tone} {adj}"
    return template.format(obj=obj, adj=adj, a_adj=_with_article(adj), noun=bg_noun)


def explicit_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption that names all three attributes, e.g. "a red smiley on a striped background" (for evaluation)."""
    adjs = _BG_ADJ[scene.background]
    return f"{_with_article(f'{scene.colour} {scene.shape}')} on {_with_article(adjs[rng.integers(len(adjs))])} background"


# --------------------------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------------------------


def training_example(
    rng: np.random.Generator, size: int = 32, memorized_rate: float = 0.02
) -> tuple[np.ndarray, str, Scene]:
    """One (image, caption, scene) from the training distribution.

    With probability ``memorized_rate`` the example is the memorized image (an exact duplicate, as with the
    memorized images of real data sets) with ``MEMORIZED_CAPTION``; otherwise a ``sample_scene`` scene.
    """
    if rng.random() < memorized_rate:
        return memorized_image(size), MEMORIZED_CAPTION, MEMORIZED_SCENE
    scene = sample_scene(rng)
    return render(scene, size), caption(scene, rng), scene


def training_batch(
    seed: int, index_start: int, n: int, size: int = 32, memorized_rate: float = 0.02
) -> tuple[np.ndarray, list[str]]:
    """Examples ``index_start .. index_start + n - 1`` of the training stream ``seed``.

    Returns (images uint8 [n, size, size, 3], captions). Example ``i`` depends only on (seed, i), via
    ``np.random.default_rng([seed, i])``, so batches can be made in any order, on any host.
    """
    images = np.empty((n, size, size, 3), np.uint8)
    captions: list[str] = []
    for k in range(n):
        image, text, _ = training_example(np.random.default_rng([seed, index_start + k]), size, memorized_rate)
        images[k] = image
        captions.append(text)
    return images, captions


# --------------------------------------------------------------------------------------------------------------
# Concepts and evaluation
# --------------------------------------------------------------------------------------------------------------


def all_concepts() -> dict[str, tuple[str, ...]]:
    """Attribute -> its values, for zero-shot classification: shape (incl. instances), colour, background."""
    return {"shape": SHAPES + INSTANCES, "colour": tuple(COLOURS), "background": BACKGROUNDS}


def concept_attribute(concept: str) -> str:
    """The attribute ("shape", "colour" or "background") a concept value belongs to."""
    for attribute, values in all_concepts().items():
        if concept in values:
            return attribute
    raise ValueError(f"unknown concept {concept!r}")


def concept_prompt(concept: str) -> str:
    """The phrase an evaluator uses for a concept ("A photo depicts {phrase}"), in the captions' own words.

    Shapes and instances: "a smiley"; colours: "a red shape"; backgrounds: "a striped background"; the
    memorized image (concept "memorized" or its caption): ``MEMORIZED_CAPTION``.
    """
    if concept in ("memorized", MEMORIZED_CAPTION):
        return MEMORIZED_CAPTION
    attribute = concept_attribute(concept)
    if attribute == "shape":
        return _with_article(concept)
    if attribute == "colour":
        return _with_article(f"{concept} shape")
    return _with_article(f"{concept} background")


def _box_blur(images: np.ndarray) -> np.ndarray:
    """3x3 box blur of float [N, H, W, C] images, edges replicated."""
    p = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return (rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]) / 9.0


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Float [N, H, W, 3] images resized to ``size`` (block means for integer factors, else bilinear)."""
    n, h, w, _ = images.shape
    if h == w == size:
        return images
    if h == w and h % size == 0:
        f = h // size
        return images.reshape(n, size, f, size, f, 3).mean(axis=(2, 4))
    from PIL import Image  # noqa: PLC0415  (only for unusual sizes)

    return np.stack(
        [
            np.asarray(Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
            for im in images
        ]
    ).astype(np.float32)


def memorization_similarity(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Similarity in [0, 1] of each image to the memorized image, float [N].

    ``images``: uint8 or float in [0, 255], [N, H, W, 3] or a single [H, W, 3]; resized to ``size`` first.
    The score is the Pearson correlation over all pixels and channels between the 3x3-blurred image and the
    blurred memorized image, clipped at 0: insensitive to overall brightness and contrast, and to the
    one-pixel shifts and blur of a model's reproduction, but low for any other composition. Compare with
    ``MEMORIZATION_THRESHOLD``.
    """
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected [N, H, W, 3] images, got shape {x.shape}")
    x = _box_blur(_resize(x, size)).reshape(x.shape[0], -1)
    ref = _box_blur(_memorized_image(size)[None].astype(np.float32)).reshape(-1)
    x = x - x.mean(axis=1, keepdims=True)
    ref = ref - ref.mean()
    denom = np.linalg.norm(x, axis=1) * np.linalg.norm(ref)
    corr = (x @ ref) / np.maximum(denom, 1e-6)  # a flat image has no correlation with anything
    return np.clip(corr, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------------------------


def preview_grid(size: int = 32, per_row: int = 8, seed: int = 0, zoom: int = 1) -> np.ndarray:
    """uint8 image of random scenes, one row per shape and instance, plus a last row of memorized renders.

    ``zoom`` enlarges each pixel (nearest neighbour) for viewing; a 2-pixel gutter separates tiles.
    """
    rng = np.random.default_rng(seed)
    rows = [[render(sample_scene(rng, shapes=[s]), size) for _ in range(per_row)] for s in SHAPES + INSTANCES]
    rows.append([render(memorized_scene(rng if k else None), size) for k in range(per_row)])
    g = 2
    out = np.full((len(rows) * (size + g) + g, per_row * (size + g) + g, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            out[g + i * (size + g) : g + i * (size + g) + size, g + j * (size + g) : g + j * (size + g) + size] = tile
    return np.repeat(np.repeat(out, zoom, axis=0), zoom, axis=1)

"""Appearance of the synthetic people and cameras: the colour palette, identities in colour
families (clothing, body proportions, gait) and cameras (scene, colour cast, viewing angle,
sharpness)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["Identity", "Camera", "make_family", "make_identity", "make_placement_family",
           "make_placement_identity", "make_camera", "PALETTE", "SKIN", "HAIR", "SCENE_WIDTH", "FAMILIES"]

# A small shared palette of clothing colours (RGB), skin tones and hair colours.
PALETTE = np.array([(30, 30, 35), (225, 225, 220), (125, 125, 130), (185, 35, 40), (40, 65, 165),
                    (40, 125, 65), (220, 190, 50), (150, 105, 65), (140, 60, 150)], np.float64)
SKIN = np.array([(235, 195, 165), (195, 145, 105), (120, 80, 55)], np.float64)
HAIR = np.array([(25, 20, 20), (100, 65, 35), (210, 180, 110), (150, 150, 150)], np.float64)
SCENE_WIDTH = 8  # a camera's scene, in crop widths: tracklets see different stretches of it
LOWER_STYLES = ("trousers", "trousers", "shorts", "skirt")
#: How identities of a family differ: ``colours`` (colours placed on different garments with different
#: patterns and areas) or ``placement`` (the same colour areas, only where they are differs).
FAMILIES = ("colours", "placement")
#: Where a placement family's accent colour goes (one side only): a sleeve, a trouser leg, a side bag.
ACCENTS = ("arm", "leg", "bag")
#: Fraction of the torso's height, from the bottom, that high-waisted trousers cover, by sleeve
#: length (short_sleeves False, True): with it the upper garment and the trousers cover equal
#: areas on average over viewing angles and gait phases (measured on masks of rendered people), so
#: a swap of their colours leaves the person's colour histogram unchanged.
EQUAL_AREA_WAIST = {False: 0.17, True: 0.0}


def _rgb(color) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.rint(color), 0, 255))


@dataclass(frozen=True)
class Identity:
    """One person's appearance, body shape and gait (colours as RGB int tuples)."""

    skin: tuple
    hair: tuple
    hat: tuple | None
    top: tuple
    top2: tuple
    pattern: str
    short_sleeves: bool
    lower: tuple
    lower_style: str
    shoes: tuple
    bag: tuple | None
    height: float      # fraction of the crop height
    build: float       # width factor
    legs: float        # hip height / body height
    stride: float      # hip swing amplitude (rad)
    cadence: float     # gait cycles per frame
    arm_swing: float   # shoulder swing amplitude (rad)
    waist: float = 0.0                # fraction of the torso (from the bottom) in the lower colour
    accent: tuple | None = None       # the colour of one-sided clothing (``accent_on``)
    accent_on: str | None = None      # "l_arm", "r_arm", "l_leg", "r_leg", "l_bag" or "r_bag"


def _jitter(rng: np.random.Generator, color, amount: float = 10.0) -> tuple[int, int, int]:
    """``color`` moved by Gaussian noise, as the int RGB tuple PIL draws with."""
    return _rgb(np.asarray(color, np.float64) + rng.normal(0, amount, 3))


def make_family(rng: np.random.Generator) -> dict:
    """The traits a colour family shares: three palette colours (A, B, C), skin, hair, shoes, hat,
    bag, sleeve length, lower-body style and a pair of top patterns with similar areas of C."""
    a, b, c = (PALETTE[int(i)] for i in rng.choice(len(PALETTE), 3, replace=False))
    pairs = (("stripes", "two_tone"), ("solid", "logo"), ("jacket", "jacket"), ("two_tone", "stripes"))
    return dict(colors=(a, b, c), skin=SKIN[int(rng.integers(len(SKIN)))], hair=HAIR[int(rng.integers(len(HAIR)))],
                shoes=PALETTE[0] if rng.random() < 0.5 else c, hat=c if rng.random() < 0.2 else None,
                bag=(c if rng.random() < 0.5 else PALETTE[int(rng.integers(len(PALETTE)))])
                if rng.random() < 0.3 else None,
                short_sleeves=bool(rng.random() < 0.35),
                lower_style=LOWER_STYLES[int(rng.integers(len(LOWER_STYLES)))],
                patterns=pairs[int(rng.integers(len(pairs)))])


def make_identity(rng: np.random.Generator, family: dict, member: int, body_spread: float = 1.0) -> Identity:
    """Member ``member`` of a colour family (:func:`make_family`): members wear the same colours
    placed differently (A on the top and B below, or the reverse; one pattern of the pair or the
    other), so their colour histograms nearly agree; body shape and gait are the member's own."""
    a, b, c = family["colors"]
    if member % 2:
        a, b = b, a
    optional = {key: None if family[key] is None else _jitter(rng, family[key]) for key in ("hat", "bag")}
    return Identity(
        skin=_jitter(rng, family["skin"], 6), hair=_jitter(rng, family["hair"], 6),
        top=_jitter(rng, a), top2=_jitter(rng, c), pattern=family["patterns"][(member // 2) % 2],
        short_sleeves=family["short_sleeves"], lower=_jitter(rng, b), lower_style=family["lower_style"],
        shoes=_jitter(rng, family["shoes"]), **_body(rng, body_spread), **optional)


def _body(rng: np.random.Generator, spread: float = 1.0) -> dict:
    """An identity's body proportions and gait.  ``spread`` widens (or narrows) the ranges of
    stature, build, leg length, stride and arm swing about their centres (arm swing kept >= 0);
    the cadence's range stays."""
    def draw(low: float, high: float, floor: float | None = None) -> float:
        if spread != 1.0:  # the neutral spread draws exactly the default's numbers
            centre, half = (low + high) / 2, (high - low) / 2 * spread
            low, high = centre - half, centre + half
            if floor is not None:
                low = max(low, floor)
        return float(rng.uniform(low, high))

    return dict(height=draw(0.80, 0.92), build=draw(0.85, 1.2), legs=draw(0.45, 0.53), stride=draw(0.25, 0.5),
                cadence=float(rng.uniform(0.06, 0.11)), arm_swing=draw(0.15, 0.55, floor=0.0))


def make_placement_family(rng: np.random.Generator) -> dict:
    """The traits a placement family shares: colours A, B (upper garment and high-waisted trousers
    of about equal areas) and C (an accent on one side: a sleeve, a trouser leg or a side bag, or
    none), skin, hair, shoes, hat, sleeve length; and the members' placements (whether A and B are
    swapped, which side the accent is on), all different."""
    a, b, c = (PALETTE[int(i)] for i in rng.choice(len(PALETTE), 3, replace=False))
    accent = ACCENTS[int(rng.integers(len(ACCENTS)))] if rng.random() < 0.75 else None
    sides = ("l", "r") if accent is not None else (None,)
    placements = [(swap, side) for swap in (False, True) for side in sides]
    order = rng.permutation(len(placements))
    return dict(colors=(a, b, c), skin=SKIN[int(rng.integers(len(SKIN)))], hair=HAIR[int(rng.integers(len(HAIR)))],
                shoes=PALETTE[0] if rng.random() < 0.5 else PALETTE[1], hat=c if rng.random() < 0.2 else None,
                short_sleeves=bool(rng.random() < 0.35), accent=accent,
                placements=[placements[int(i)] for i in order])


def make_placement_identity(rng: np.random.Generator, family: dict, member: int,
                            body_spread: float = 1.0) -> Identity:
    """Member ``member`` (< ``len(family["placements"])``) of a placement family
    (:func:`make_placement_family`): the family's colours over the same areas, A above and B below
    or the reverse, the accent on the member's side; body shape and gait are the member's own."""
    a, b, c = family["colors"]
    swap, side = family["placements"][member]
    if swap:
        a, b = b, a
    accent = family["accent"]
    return Identity(
        skin=_jitter(rng, family["skin"], 6), hair=_jitter(rng, family["hair"], 6),
        hat=None if family["hat"] is None else _jitter(rng, family["hat"]),
        top=_jitter(rng, a), top2=_jitter(rng, c), pattern="solid", short_sleeves=family["short_sleeves"],
        lower=_jitter(rng, b), lower_style="trousers", shoes=_jitter(rng, family["shoes"]), bag=None,
        waist=EQUAL_AREA_WAIST[family["short_sleeves"]],
        accent=None if accent is None else _jitter(rng, c), accent_on=None if accent is None else f"{side}_{accent}",
        **_body(rng, body_spread))


def _identities(rng: np.random.Generator, count: int, families: str = "colours",
                gait_twins: float = 0.0, body_spread: float = 1.0) -> tuple[list[Identity], list[tuple[int, int]]]:
    """``count`` identities in families of 2-4 members (:data:`FAMILIES`), and the pairs of gait
    twins among them (0-based indices): with probability ``gait_twins`` a family is replaced by two
    people of one appearance (the same colours, no per-person variation) whose proportions and gait
    differ.  ``body_spread``: see :func:`_body`."""
    new_family, new_member = {"colours": (make_family, make_identity),
                              "placement": (make_placement_family, make_placement_identity)}[families]
    out, twins = [], []
    while len(out) < count:
        family = new_family(rng)
        if gait_twins > 0 and rng.random() < gait_twins:
            first = new_member(rng, family, 0, body_spread)
            twins.append((len(out), len(out) + 1))
            out.extend([first, dataclasses.replace(first, **_body(rng, body_spread))])
            continue
        size = int(rng.integers(2, 5))
        if families == "placement":
            size = min(size, len(family["placements"]))
        for member in range(size):
            out.append(new_member(rng, family, member, body_spread))
    return out[:count], [pair for pair in twins if pair[1] < count]


@dataclass(frozen=True)
class Camera:
    """One camera: background scene (wider than a crop), colour gains, viewing angles, sharpness."""

    background: np.ndarray   # uint8 [H, SCENE_WIDTH * W, 3] scaled by ``sharpness``
    gains: np.ndarray        # per-channel multipliers (colour cast and brightness)
    view: float              # main viewing angle (rad): 0 = people walk toward the camera
    sharpness: float         # render scale (1 = full resolution)


def make_camera(rng: np.random.Generator, size: tuple[int, int]) -> Camera:
    """A camera with a random scene ``SCENE_WIDTH`` crops wide (stretches of wall with windows,
    doors and posters, a floor) and a colour cast."""
    height, width = size
    scene = SCENE_WIDTH * width
    image = Image.new("RGB", (scene, height))
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.45, 0.7))
    # Scenes are mostly grey (a slight tint) as real corridors and streets are.
    x = 0.0
    while x < scene:
        wall = rng.uniform(70, 200) * rng.uniform(0.88, 1.12, 3)
        floor = rng.uniform(60, 160) * rng.uniform(0.9, 1.1, 3)
        stretch = rng.uniform(0.7, 2.5) * width
        draw.rectangle([x, 0, x + stretch, horizon], fill=_rgb(wall))
        draw.rectangle([x, horizon, x + stretch, height], fill=_rgb(floor))
        for _ in range(int(rng.integers(1, 4))):
            x0 = x + rng.uniform(-5, stretch)
            y0 = rng.uniform(-10, horizon - 8)
            w, h = rng.uniform(6, 30) * width / 64, rng.uniform(8, 50) * height / 128
            color = PALETTE[int(rng.integers(len(PALETTE)))] if rng.random() < 0.15 else wall * rng.uniform(0.5, 1.3)
            draw.rectangle([x0, y0, x0 + w, min(y0 + h, horizon)], fill=_jitter(rng, color, 15))
        x += stretch
    for x in np.arange(rng.uniform(0, 20), scene, rng.uniform(12, 30) * width / 64):
        draw.line([(x, horizon), (x + rng.uniform(-20, 20), height)], fill=(60, 60, 60), width=1)
    cast = rng.uniform(0.9, 1.1, 3)
    gains = cast / cast.mean() * rng.uniform(0.8, 1.1)
    view = float(rng.choice([0.0, math.pi, math.pi / 2, -math.pi / 2, math.pi / 4, -3 * math.pi / 4]))
    sharpness = float(rng.choice([1.0, 1.0, 0.75, 0.6]))
    if sharpness != 1.0:
        image = image.resize((round(scene * sharpness), round(height * sharpness)), Image.BILINEAR)
    return Camera(np.asarray(image), gains, view, sharpness)

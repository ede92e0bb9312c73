"""A procedural video re-ID dataset with exact keypoints, written in the MARS layout.

What it models
--------------
* **People** built from a small shared palette: skin, hair, an optional hat, a top (solid, striped,
  two-tone, an open jacket over a shirt, or a chest logo) with long or short sleeves, trousers /
  shorts / a skirt, shoes, an optional backpack.  Identities come in *families* that share their
  colours, skin, hair and accessories, placed on different body parts (a red top over blue trousers
  and a blue top over red trousers; stripes or a two-tone top), so their colour histograms are close
  while a model that knows where the torso and the legs are separates them.  (Top and legs do not
  cover equal areas, so a histogram of the person's pixels alone still tells most members apart;
  what defeats a whole-crop histogram is mostly the background and each camera's colour cast.)
  Identities also differ by body proportions (height, build, leg length) and gait (stride, cadence,
  arm swing).
* **Walking**: an articulated 3-D stick figure (hip / knee / shoulder / elbow angles driven by the
  gait phase, a vertical bob), seen from the camera's viewing angle (front, back, side, oblique) by
  an orthographic projection, drawn with depth order (the far arm behind the torso).
* **Cameras** (``num_cameras``, each identity seen by 2-4): their own background scene (scrolling
  as the tracker follows the person), colour cast and brightness, viewing-angle distribution and
  sharpness (some cameras render at lower resolution).
* **Detection**: crops jittered in position and scale from frame to frame; occluders (poles, low
  walls, passers-by blobs) over runs of frames of some tracklets.
* **Keypoints** as a pose estimator gives them: COCO-17 projected from the skeleton, with Gaussian
  noise, lower confidence on self-occluded joints (far limbs, a face seen from behind), joints under
  an occluder often missed, a few random misses; joints leaving the frame are missing.
* **MARS test conventions**: per identity, query tracklets from some of its cameras and the rest in
  the gallery; distractor tracklets (pid 0, people not otherwise in the data) in the gallery and
  junk tracklets (pid -1, crops that cut the person off) as MARS has.

What it does not model
----------------------
Real textures, cloth folds and shading, faces, carried objects other than backpacks, crowds
(no second person overlapping the target except blob occluders), perspective, motion blur, ID
switches inside a tracklet, pose-estimator left/right swaps, illumination changes inside a frame.
It measures what body-aligned methods are about (colour *placement*, shape, gait, part occlusion)
on easy appearance; it is no substitute for results on MARS.

Output: ``bbox_{train,test}/<pid4>/<pid4>C<cam>T<tracklet4>F<frame3>.jpg``, ``info/`` (names,
``tracks_*_info.mat``, ``query_IDX.mat``), ``bbox_{train,test}_keypoints/<pid4>/<frame>.pose``
(KMPNet format, pixels of the frame) and ``synthetic.json`` (the parameters and counts).
Deterministic: the same parameters give byte-identical files.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from keypointops.data.keypoint_files import write_pose

__all__ = ["VERSION", "DEFAULTS", "generate", "default_root", "ensure_synthetic", "render_tracklet",
           "make_family", "make_identity", "make_camera"]

#: Bumped whenever the rendering changes, so cached datasets of an older version are not reused.
VERSION = 2

#: The default parameters (the main job's dataset): 12,934 frames of 128 x 64 (39 MB), 35 CPU-seconds
#: to generate in two processes (83 s of wall time measured on a 2-core machine at load average ~8).
DEFAULTS = dict(num_train_ids=80, num_test_ids=80, seed=0, num_cameras=6, frames=20, size=(128, 64),
                distractors=0.08, junk=0.04, occluders=0.3)

# A small shared palette of clothing colours (RGB), skin tones and hair colours.
PALETTE = np.array([(30, 30, 35), (225, 225, 220), (125, 125, 130), (185, 35, 40), (40, 65, 165),
                    (40, 125, 65), (220, 190, 50), (150, 105, 65), (140, 60, 150)], np.float64)
SKIN = np.array([(235, 195, 165), (195, 145, 105), (120, 80, 55)], np.float64)
HAIR = np.array([(25, 20, 20), (100, 65, 35), (210, 180, 110), (150, 150, 150)], np.float64)
SCENE_WIDTH = 8  # a camera's scene, in crop widths: tracklets see different stretches of it
TOP_PATTERNS = ("solid", "stripes", "two_tone", "jacket", "logo")
LOWER_STYLES = ("trousers", "trousers", "shorts", "skirt")


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


def make_identity(rng: np.random.Generator, family: dict, member: int) -> Identity:
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
        shoes=_jitter(rng, family["shoes"]),
        height=float(rng.uniform(0.80, 0.92)), build=float(rng.uniform(0.85, 1.2)),
        legs=float(rng.uniform(0.45, 0.53)), stride=float(rng.uniform(0.25, 0.5)),
        cadence=float(rng.uniform(0.06, 0.11)), arm_swing=float(rng.uniform(0.15, 0.55)), **optional)


def _identities(rng: np.random.Generator, count: int) -> list[Identity]:
    """``count`` identities in colour families of 2-4 members."""
    out = []
    while len(out) < count:
        family = make_family(rng)
        for member in range(int(rng.integers(2, 5))):
            out.append(make_identity(rng, family, member))
    return out[:count]


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


# --------------------------------------------------------------------------------------------
# The body: 3-D joints from the gait phase, projection, drawing
# --------------------------------------------------------------------------------------------
# COCO-17 joint indices.
NOSE, L_EYE, R_EYE, L_EAR, R_EAR, L_SHO, R_SHO, L_ELB, R_ELB, L_WRI, R_WRI, L_HIP, R_HIP, \
    L_KNE, R_KNE, L_ANK, R_ANK = range(17)


def _body_joints(person: Identity, phase: float) -> dict[str, np.ndarray]:
    """3-D points (x: the person's left, y: up, z: forward; units of body height) at ``phase``."""
    b = person.build
    hip_y = person.legs + 0.012 * math.cos(2 * phase)
    shoulder_y = hip_y + (0.82 - person.legs) * 1.0
    head_r = 0.062
    p = {"head": np.array([0.0, shoulder_y + 0.04 + head_r * 1.4, 0.01]), "head_r": head_r}
    for side, sign, ph in (("l", 1.0, phase), ("r", -1.0, phase + math.pi)):
        hip = np.array([sign * 0.08 * b, hip_y, 0.0])
        alpha = person.stride * math.sin(ph)
        beta = 1.6 * person.stride * max(0.0, math.sin(ph + 2.2))
        thigh, shin = 0.52 * (hip_y - 0.04), 0.48 * (hip_y - 0.04)
        knee = hip + thigh * np.array([0, -math.cos(alpha), math.sin(alpha)])
        ankle = knee + shin * np.array([0, -math.cos(alpha - beta), math.sin(alpha - beta)])
        shoulder = np.array([sign * 0.125 * b, shoulder_y, 0.0])
        gamma = -person.arm_swing * math.sin(ph)
        elbow = shoulder + 0.16 * np.array([0.02 * sign, -math.cos(gamma), math.sin(gamma)])
        delta = gamma + 0.25 + 0.3 * max(0.0, -math.sin(ph))
        wrist = elbow + 0.15 * np.array([0.0, -math.cos(delta), math.sin(delta)])
        p.update({f"{side}_hip": hip, f"{side}_knee": knee, f"{side}_ankle": ankle,
                  f"{side}_shoulder": shoulder, f"{side}_elbow": elbow, f"{side}_wrist": wrist})
    return p


class _Projection:
    """Orthographic view from angle ``theta`` (0: the person faces the camera), scaled to pixels."""

    def __init__(self, theta: float, scale: float, cx: float, feet_y: float):
        self.c, self.s, self.scale, self.cx, self.feet_y = math.cos(theta), math.sin(theta), scale, cx, feet_y

    def uv(self, p: np.ndarray) -> tuple[float, float]:
        return (self.cx + self.scale * (p[0] * self.c + p[2] * self.s), self.feet_y - self.scale * p[1])

    def depth(self, p: np.ndarray) -> float:
        """Distance toward the camera (larger = nearer)."""
        return p[2] * self.c - p[0] * self.s


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Convex hull (monotone chain) of 2-D points."""
    pts = sorted(set(points))
    if len(pts) <= 2:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def _clip(poly: list[tuple[float, float]], axis: int, lo: float, hi: float) -> list[tuple[float, float]]:
    """The part of a convex polygon with ``lo <= coordinate[axis] <= hi`` (Sutherland-Hodgman)."""
    for bound, keep in ((lo, lambda v: v >= lo), (hi, lambda v: v <= hi)):
        out = []
        for i, cur in enumerate(poly):
            prev = poly[i - 1]
            if keep(cur[axis]) != keep(prev[axis]):
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if keep(cur[axis]):
                out.append(cur)
        poly = out
        if not poly:
            break
    return poly


class _Canvas:
    """Draws on the frame and, when asked, on a person mask (255 = person pixel)."""

    def __init__(self, image: Image.Image, mask: Image.Image | None):
        self.draw = ImageDraw.Draw(image)
        self.mask = ImageDraw.Draw(mask) if mask is not None else None

    def polygon(self, points, color, person=True):
        if len(points) >= 3:
            self.draw.polygon(points, fill=color)
            if self.mask is not None:
                self.mask.polygon(points, fill=255 if person else 0)

    def limb(self, a, b, width, color):
        w = max(1, int(round(width)))
        self.draw.line([a, b], fill=color, width=w)
        self.disc(a, width / 2, color)
        self.disc(b, width / 2, color)
        if self.mask is not None:
            self.mask.line([a, b], fill=255, width=w)

    def disc(self, c, r, color, person=True):
        box = [c[0] - r, c[1] - r, c[0] + r, c[1] + r]
        self.draw.ellipse(box, fill=color)
        if self.mask is not None:
            self.mask.ellipse(box, fill=255 if person else 0)


def _draw_person(canvas: _Canvas, person: Identity, joints: dict, proj: _Projection) -> None:
    """Draws the person in depth order (far limbs first)."""
    s = proj.scale
    uv = {name: proj.uv(p) for name, p in joints.items() if name != "head_r"}
    b = person.build
    items = []  # (depth, draw function)

    def leg(side):
        hip, knee, ankle = uv[f"{side}_hip"], uv[f"{side}_knee"], uv[f"{side}_ankle"]
        width = 0.085 * b * s
        if person.lower_style == "trousers":
            canvas.limb(hip, knee, width, person.lower)
            canvas.limb(knee, ankle, width * 0.9, person.lower)
        else:
            canvas.limb(knee, ankle, width * 0.75, person.skin)
            mid = tuple(h + 0.55 * (k - h) for h, k in zip(hip, knee))
            canvas.limb(mid, knee, width * 0.8, person.skin)
            canvas.limb(hip, mid, width * 1.05, person.lower)
        forward = 0.05 * s * proj.s
        canvas.disc((ankle[0] + forward * 0.5, ankle[1]), 0.035 * s, person.shoes)

    def arm(side):
        sho, elb, wri = uv[f"{side}_shoulder"], uv[f"{side}_elbow"], uv[f"{side}_wrist"]
        width = 0.06 * b * s
        sleeve = person.top2 if person.pattern == "jacket" else person.top
        if person.short_sleeves:
            mid = tuple(a + 0.5 * (e - a) for a, e in zip(sho, elb))
            canvas.limb(mid, elb, width * 0.8, person.skin)
            canvas.limb(elb, wri, width * 0.75, person.skin)
            canvas.limb(sho, mid, width, sleeve)
        else:
            canvas.limb(sho, elb, width, sleeve)
            canvas.limb(elb, wri, width * 0.9, sleeve)
        canvas.disc(wri, 0.025 * s, person.skin)

    def torso():
        depth = 0.05 * b
        corners = []
        for side in ("l", "r"):
            for z in (-depth, depth):
                corners.append(proj.uv(joints[f"{side}_shoulder"] + np.array([0, 0.01, z])))
                corners.append(proj.uv(joints[f"{side}_hip"] + np.array([0, -0.03, z])))
        poly = _hull(corners)
        canvas.polygon(poly, person.top2 if person.pattern == "jacket" else person.top)
        top_y = min(p[1] for p in poly)
        bottom_y = max(p[1] for p in poly)
        height = bottom_y - top_y
        centre = sum(p[0] for p in poly) / len(poly)
        facing = proj.c > -0.3
        if person.pattern == "stripes":
            for k in range(3):
                y0 = top_y + height * (0.2 + 0.27 * k)
                canvas.polygon(_clip(poly, 1, y0, y0 + height * 0.12), person.top2)
        elif person.pattern == "two_tone":
            canvas.polygon(_clip(poly, 1, top_y, top_y + 0.45 * height), person.top2)
        elif person.pattern == "jacket" and facing:
            canvas.polygon(_clip(poly, 0, centre - 0.035 * s * abs(proj.c), centre + 0.035 * s * abs(proj.c)),
                           person.top)
        elif person.pattern == "logo" and facing and abs(proj.c) > 0.4:
            r = 0.035 * s
            y = top_y + 0.35 * height
            canvas.polygon([(centre - r, y - r), (centre + r, y - r), (centre + r, y + r), (centre - r, y + r)],
                           person.top2)
        if person.lower_style == "skirt":
            hips = [proj.uv(joints[f"{sd}_hip"] + np.array([0, -0.02, 0])) for sd in ("l", "r")]
            knees = [proj.uv(joints[f"{sd}_hip"] + np.array([1.6 * (j[0]), -0.2, 0]))
                     for sd, j in (("l", joints["l_hip"]), ("r", joints["r_hip"]))]
            canvas.polygon(_hull(hips + knees + [proj.uv(joints["l_hip"] + np.array([0, -0.02, 0.05])),
                                                 proj.uv(joints["r_hip"] + np.array([0, -0.02, -0.05]))]),
                           person.lower)

    def bag():
        if person.bag is None:
            return
        corners = [proj.uv(joints["l_shoulder"] * np.array([0.8, 1, 1]) + np.array([0, -0.02, -0.07])),
                   proj.uv(joints["r_shoulder"] * np.array([0.8, 1, 1]) + np.array([0, -0.02, -0.07])),
                   proj.uv(joints["l_shoulder"] * np.array([0.8, 1, 1]) + np.array([0, -0.2, -0.12])),
                   proj.uv(joints["r_shoulder"] * np.array([0.8, 1, 1]) + np.array([0, -0.2, -0.12])),
                   proj.uv(joints["l_shoulder"] * np.array([0.8, 1, 1]) + np.array([0, -0.2, -0.05])),
                   proj.uv(joints["r_shoulder"] * np.array([0.8, 1, 1]) + np.array([0, -0.2, -0.05]))]
        canvas.polygon(_hull(corners), person.bag)

    def head():
        r = joints["head_r"] * s
        centre = uv["head"]
        back = (-0.35 * r * proj.s, -0.25 * r)
        hair_centre = (centre[0] + back[0], centre[1] + back[1])
        hair_behind = -proj.c * 0.35 < 0
        if hair_behind:
            canvas.disc(hair_centre, r * 1.02, person.hair)
        canvas.disc(centre, r, person.skin)
        if not hair_behind:
            canvas.disc(hair_centre, r * 0.98, person.hair)
        if person.hat is not None:
            top = (centre[0], centre[1] - 0.7 * r)
            canvas.polygon([(top[0] - 1.1 * r, top[1] + 0.3 * r), (top[0] + 1.1 * r, top[1] + 0.3 * r),
                            (top[0] + 0.8 * r, top[1] - 0.6 * r), (top[0] - 0.8 * r, top[1] - 0.6 * r)], person.hat)

    for side in ("l", "r"):
        items.append((proj.depth(joints[f"{side}_hip"]) * 1.0 - 0.001, lambda side=side: leg(side)))
        items.append((proj.depth(joints[f"{side}_shoulder"]) + 0.5 * proj.depth(joints[f"{side}_wrist"]),
                      lambda side=side: arm(side)))
    items.append((0.0, torso))
    items.append((-0.12 * abs(proj.c) - 0.06, bag) if proj.c > 0 else (0.12, bag))
    items.append((0.2, head))
    for _, fn in sorted(items, key=lambda item: item[0]):
        fn()


def _keypoints_2d(joints: dict, proj: _Projection) -> tuple[np.ndarray, np.ndarray]:
    """COCO-17 ``[17, 2]`` image points and a visibility factor in [0, 1] per joint
    (self-occlusion: far limbs and a face seen from behind get less)."""
    r = joints["head_r"]
    head = joints["head"]
    pts = np.zeros((17, 3))
    pts[NOSE] = head + np.array([0, -0.15 * r, 0.95 * r])
    pts[L_EYE] = head + np.array([0.38 * r, 0.15 * r, 0.8 * r])
    pts[R_EYE] = head + np.array([-0.38 * r, 0.15 * r, 0.8 * r])
    pts[L_EAR] = head + np.array([0.95 * r, 0.0, -0.1 * r])
    pts[R_EAR] = head + np.array([-0.95 * r, 0.0, -0.1 * r])
    for side, offset in (("l", 0), ("r", 1)):
        for name, base in (("shoulder", L_SHO), ("elbow", L_ELB), ("wrist", L_WRI), ("hip", L_HIP),
                           ("knee", L_KNE), ("ankle", L_ANK)):
            pts[base + offset] = joints[f"{side}_{name}"]
    uv = np.stack([proj.cx + proj.scale * (pts[:, 0] * proj.c + pts[:, 2] * proj.s),
                   proj.feet_y - proj.scale * pts[:, 1]], 1)
    depth = pts[:, 2] * proj.c - pts[:, 0] * proj.s
    visibility = np.clip(0.75 + depth / 0.12, 0.25, 1.0)
    face = np.clip(0.5 + proj.c, 0.0, 1.0)
    visibility[[NOSE, L_EYE, R_EYE]] *= face
    return uv, visibility


# --------------------------------------------------------------------------------------------
# Tracklets
# --------------------------------------------------------------------------------------------
def render_tracklet(rng: np.random.Generator, person: Identity, camera: Camera, length: int,
                    size: tuple[int, int], *, occluders: float = 0.3, junk: bool = False,
                    with_masks: bool = False):
    """Renders one tracklet: ``(frames: list of PIL RGB images, keypoints float32 [length, 17, 3]
    in frame pixels (missing = 0), masks: list of PIL "L" person masks or None)``.

    ``junk`` renders a bad detection (the crop cuts the person off, as MARS's junk tracklets).
    """
    height, width = size
    theta = camera.view + (math.pi if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.25)
    walk = math.sin(theta)  # sideways component: the background scrolls
    phase0 = rng.uniform(0, 2 * math.pi)
    bg_x = rng.uniform(width, (SCENE_WIDTH - 2) * width)
    jitter = np.zeros(3)
    base_scale = person.height * height * rng.uniform(0.95, 1.05)
    if junk:
        offset = np.array([rng.choice([-1, 1]) * rng.uniform(0.35, 0.6) * width, rng.uniform(-0.4, 0.3) * height])
    else:
        offset = np.zeros(2)
    occluder = None
    if not junk and rng.random() < occluders:
        start = int(rng.integers(0, max(1, length - 3)))
        stop = int(min(length, start + rng.integers(max(2, length // 3), length + 1)))
        kind = rng.integers(3)
        color = PALETTE[int(rng.integers(len(PALETTE)))] * rng.uniform(0.7, 1.1)
        if kind == 0:   # pole / door frame
            x0 = rng.uniform(0, width * 0.8)
            box = (x0, 0, x0 + rng.uniform(0.12, 0.3) * width, height)
        elif kind == 1:  # low wall / bench / car
            box = (0, height * rng.uniform(0.6, 0.8), width, height)
        else:            # a passer-by's blob at the side
            x0 = rng.choice([-0.1, 0.55]) * width
            box = (x0, height * rng.uniform(0.1, 0.4), x0 + 0.55 * width, height * 1.1)
        occluder = (start, stop, box, kind, _jitter(rng, color))
    render_scale = camera.sharpness
    rh, rw = max(8, int(round(height * render_scale))), max(4, int(round(width * render_scale)))
    frames, masks = [], []
    # The colour cast is linear per channel: tint the scene and the colours instead of every frame.
    gains = camera.gains * rng.uniform(0.92, 1.08)
    background = np.clip(np.rint(camera.background * gains), 0, 255).astype(np.uint8)
    person = _tinted(person, gains)
    if occluder is not None:
        occluder = occluder[:4] + (_rgb(np.asarray(occluder[4]) * gains),)
    uvs, visibilities = np.zeros((length, 17, 2)), np.zeros((length, 17))
    occluded = np.zeros((length, 17), bool)
    for t in range(length):
        jitter = 0.6 * jitter + rng.normal(0, 1, 3) * np.array([0.03 * width, 0.02 * height, 0.03])
        scale = base_scale * (1 + jitter[2])
        phase = phase0 + 2 * math.pi * person.cadence * t
        cx = width / 2 + jitter[0] + offset[0]
        feet = height * 0.965 + jitter[1] + offset[1] + (scale - base_scale) * 0.5
        proj = _Projection(theta, scale * render_scale, cx * render_scale, feet * render_scale)
        x = int(np.clip(bg_x + walk * t * 1.5 + 0.5 * jitter[0], 0, (SCENE_WIDTH - 1) * width - 1) * render_scale)
        image = Image.fromarray(np.ascontiguousarray(background[:rh, x:x + rw]))
        mask = Image.new("L", (rw, rh), 0) if with_masks else None
        canvas = _Canvas(image, mask)
        joints = _body_joints(person, phase)
        _draw_person(canvas, person, joints, proj)
        uv, visibilities[t] = _keypoints_2d(joints, proj)
        uvs[t] = uv = uv / render_scale
        if occluder is not None and occluder[0] <= t < occluder[1]:
            x0, y0, x1, y1 = occluder[2]
            drift = (t - occluder[0]) * (0.8 if occluder[3] == 2 else 0.0)
            box = [(x0 + drift) * render_scale, y0 * render_scale, (x1 + drift) * render_scale, y1 * render_scale]
            if occluder[3] == 2:
                canvas.disc(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), (box[2] - box[0]) / 2,
                            occluder[4], person=False)
                canvas.polygon([(box[0], (box[1] + box[3]) / 2), (box[2], (box[1] + box[3]) / 2),
                                (box[2], box[3]), (box[0], box[3])], occluder[4], person=False)
            else:
                canvas.polygon([(box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3])],
                               occluder[4], person=False)
            bx0, by0, bx1, by1 = (v / render_scale for v in box)
            occluded[t] = (uv[:, 0] >= bx0) & (uv[:, 0] <= bx1) & (uv[:, 1] >= by0) & (uv[:, 1] <= by1)
        if render_scale != 1.0:
            image = image.resize((width, height), Image.BILINEAR)
            if mask is not None:
                mask = mask.resize((width, height), Image.NEAREST)
        frames.append(image)
        masks.append(mask)
    return frames, _estimate(rng, uvs, visibilities, occluded, size), (masks if with_masks else None)


def _tinted(person: Identity, gains: np.ndarray) -> Identity:
    """``person`` with every colour multiplied by the per-channel ``gains``."""
    return dataclasses.replace(person, **{
        f.name: _rgb(np.asarray(getattr(person, f.name)) * gains) for f in dataclasses.fields(person)
        if isinstance(getattr(person, f.name), tuple)})


def _estimate(rng: np.random.Generator, uv: np.ndarray, visibility: np.ndarray, occluded: np.ndarray,
              size: tuple[int, int]) -> np.ndarray:
    """A pose estimator's output ``float32 [F, 17, 3]`` for the true points ``uv [F, 17, 2]``:
    noise, confidences, misses (joints outside the frame are missing)."""
    height, width = size
    kp = np.zeros(uv.shape[:-1] + (3,), np.float32)
    noise = rng.normal(0, 1, uv.shape) * (0.008 * height) * (1.5 - 0.5 * visibility)[..., None]
    u = rng.random((4,) + visibility.shape)
    conf = visibility * (0.75 + 0.25 * u[0])
    conf = np.where(occluded, conf * (0.1 + 0.4 * u[1]), conf)
    noise[occluded] *= 3
    missed = (u[2] < 0.03) | (occluded & (u[3] < 0.6)) | (conf < 0.15)
    xy = uv + noise
    inside = (xy[..., 0] >= 0) & (xy[..., 0] < width) & (xy[..., 1] >= 0) & (xy[..., 1] < height)
    valid = inside & ~missed
    kp[valid, :2] = xy[valid]
    kp[valid, 2] = conf[valid]
    return kp


# --------------------------------------------------------------------------------------------
# The dataset on disk
# --------------------------------------------------------------------------------------------
def _normalise_params(num_train_ids, num_test_ids, seed, num_cameras, frames, size, distractors, junk,
                      occluders) -> dict:
    if isinstance(size, int):
        size = (size, size // 2)
    size = tuple(int(v) for v in size)
    if len(size) != 2 or size[0] < 16 or size[1] < 8:
        raise ValueError(f"synthetic: size must be (height, width) >= (16, 8) or a height, got {size}")
    if num_train_ids < 2 or num_test_ids < 2:
        raise ValueError(f"synthetic: num_train_ids and num_test_ids must be >= 2, got "
                         f"{num_train_ids}, {num_test_ids}")
    if not 2 <= num_cameras <= 9:
        raise ValueError(f"synthetic: num_cameras must be in [2, 9] (MARS names hold one digit), got {num_cameras}")
    if frames < 2:
        raise ValueError(f"synthetic: frames (mean tracklet length) must be >= 2, got {frames}")
    return dict(num_train_ids=int(num_train_ids), num_test_ids=int(num_test_ids), seed=int(seed),
                num_cameras=int(num_cameras), frames=int(frames), size=list(size),
                distractors=float(distractors), junk=float(junk), occluders=float(occluders))


def _plan(params: dict) -> dict[str, list[dict]]:
    """Which tracklets to render: per split, dicts (pid, cam 1-based, tracklet no., length, role,
    identity key); pids 1..num_train_ids are train, the next num_test_ids test."""
    rng = np.random.default_rng((params["seed"], 1))
    lo, hi = max(2, params["frames"] * 3 // 4), max(2, params["frames"] * 5 // 4)
    plan = {"train": [], "test": []}
    num_train = params["num_train_ids"]
    for pid in range(1, num_train + params["num_test_ids"] + 1):
        split = "train" if pid <= num_train else "test"
        cams = sorted(int(c) + 1 for c in rng.choice(params["num_cameras"], int(rng.integers(2, min(4, params["num_cameras"]) + 1)), replace=False))
        rows = []
        for cam in cams:
            for t in range(1 + int(rng.random() < 0.3)):
                rows.append(dict(pid=pid, cam=cam, tracklet=t + 1, length=int(rng.integers(lo, hi + 1)),
                                 role="gallery", identity=pid))
        if split == "test":
            query_cams = rng.choice(cams, int(rng.integers(1, len(cams))), replace=False)
            for cam in query_cams:
                next(r for r in rows if r["cam"] == cam)["role"] = "query"
        plan[split].extend(rows)
    num_test_tracklets = len(plan["test"])
    counters = {}
    extra_identity = num_train + params["num_test_ids"] + 1
    for pid, count in ((0, params["distractors"]), (-1, params["junk"])):
        for _ in range(int(round(count * num_test_tracklets))):
            cam = int(rng.integers(1, params["num_cameras"] + 1))
            counters[pid, cam] = counters.get((pid, cam), 0) + 1
            plan["test"].append(dict(pid=pid, cam=cam, tracklet=counters[pid, cam],
                                     length=int(rng.integers(lo, hi + 1)), role="gallery", identity=extra_identity))
            extra_identity += 1
    for split in plan:
        plan[split].sort(key=lambda r: (r["pid"] if r["pid"] > 0 else 10**9 - r["pid"], r["cam"], r["tracklet"]))
    return plan


_STATE: tuple = ()


def _set_state(state: tuple) -> None:
    """Sets what :func:`_write_tracklet` needs (root, parameters, cameras, people) in a process."""
    global _STATE
    _STATE = state


def _write_tracklet(job: tuple[str, int, dict]) -> list[str]:
    """Renders tracklet ``number`` of ``split`` and writes its frames and .pose files; returns the
    frame names.  Its randomness depends only on (seed, split, number): any process may render it."""
    split, number, row = job
    root, params, cameras, people = _STATE
    pid, cam = row["pid"], row["cam"]
    folder = _folder(pid)
    rng = np.random.default_rng((params["seed"], 3, 0 if split == "train" else 1, number))
    images, keypoints, _ = render_tracklet(rng, people[row["identity"] - 1], cameras[cam - 1], row["length"],
                                           tuple(params["size"]), occluders=params["occluders"], junk=pid == -1)
    names = []
    for f, (image, kp) in enumerate(zip(images, keypoints)):
        name = f"{folder}C{cam}T{row['tracklet']:04d}F{f + 1:03d}"
        image.save(root / f"bbox_{split}" / folder / f"{name}.jpg", quality=90)
        write_pose(root / f"bbox_{split}_keypoints" / folder / f"{name}.pose", kp)
        names.append(f"{name}.jpg")
    return names


def _folder(pid: int) -> str:
    return "00-1" if pid == -1 else f"{pid:04d}"


def _savemat(path: Path, name: str, array: np.ndarray) -> None:
    """``scipy.io.savemat`` with a fixed header text (scipy writes the creation time there), so the
    files are byte-identical for the same content."""
    from scipy.io import savemat

    buffer = io.BytesIO()
    savemat(buffer, {name: array}, do_compression=False)
    data = bytearray(buffer.getvalue())
    header = b"MATLAB 5.0 MAT-file, written by keypointops.data.synthetic"
    data[:116] = header.ljust(116, b" ")
    path.write_bytes(bytes(data))


def generate(root: str | os.PathLike, *, num_train_ids: int = DEFAULTS["num_train_ids"],
             num_test_ids: int = DEFAULTS["num_test_ids"], seed: int = DEFAULTS["seed"],
             num_cameras: int = DEFAULTS["num_cameras"], frames: int = DEFAULTS["frames"],
             size=DEFAULTS["size"], distractors: float = DEFAULTS["distractors"],
             junk: float = DEFAULTS["junk"], occluders: float = DEFAULTS["occluders"],
             workers: int = 2, progress: bool = True) -> dict:
    """Writes the synthetic dataset (MARS layout, see the module docstring) into ``root`` and
    returns its description (also written to ``root/synthetic.json``).

    Args:
        num_train_ids, num_test_ids: identities of each split (each seen by 2-4 cameras, 1-2
            tracklets per camera).
        seed: everything is a function of the parameters: same parameters, byte-identical files.
        num_cameras: 2..9.
        frames: mean tracklet length (lengths uniform in [3/4, 5/4] of it).
        size: frame (height, width) in pixels, or a height (width = height / 2).
        distractors, junk: pid-0 / pid-(-1) test tracklets, as a fraction of the test tracklets.
        occluders: fraction of tracklets with an occluder over a run of frames.
        workers: processes rendering in parallel (the files do not depend on it).
        progress: show a progress bar.
    """
    from tqdm import tqdm

    params = _normalise_params(num_train_ids, num_test_ids, seed, num_cameras, frames, size, distractors, junk,
                               occluders)
    size = tuple(params["size"])
    root = Path(root)
    rng = np.random.default_rng((params["seed"], 0))
    cameras = [make_camera(rng, size) for _ in range(params["num_cameras"])]
    plan = _plan(params)
    num_identities = max(r["identity"] for rows in plan.values() for r in rows)
    people = _identities(np.random.default_rng((params["seed"], 2)), num_identities)
    (root / "info").mkdir(parents=True, exist_ok=True)
    for split, rows in plan.items():
        for folder in {_folder(r["pid"]) for r in rows}:
            (root / f"bbox_{split}" / folder).mkdir(parents=True, exist_ok=True)
            (root / f"bbox_{split}_keypoints" / folder).mkdir(parents=True, exist_ok=True)
    jobs = [(split, number, row) for split, rows in plan.items() for number, row in enumerate(rows)]
    state = (root, params, cameras, people)
    workers = max(1, min(int(workers), len(jobs)))
    names = {split: [] for split in plan}
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=sum(r["length"] for _, _, r in jobs), desc="synthetic frames",
                                       unit="frame", disable=not progress))
        if workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(
                workers, initializer=_set_state, initargs=(state,)))
            results = pool.imap(_write_tracklet, jobs, chunksize=4)
        else:
            _set_state(state)
            results = map(_write_tracklet, jobs)
        for (split, _, row), tracklet_names in zip(jobs, results):
            row["frames"] = (len(names[split]) + 1, len(names[split]) + len(tracklet_names))
            names[split].extend(tracklet_names)
            bar.update(row["length"])
    counts = {}
    for split, rows in plan.items():
        info = [(r["frames"][0], r["frames"][1], r["pid"], r["cam"]) for r in rows]
        query_rows = [number + 1 for number, r in enumerate(rows) if r["role"] == "query"]
        (root / "info" / f"{split}_name.txt").write_text("".join(n + "\n" for n in names[split]))
        _savemat(root / "info" / f"tracks_{split}_info.mat", f"track_{split}_info", np.array(info, np.float64))
        if split == "test":
            _savemat(root / "info" / "query_IDX.mat", "query_IDX", np.array([query_rows], np.float64))
        counts[split] = dict(tracklets=len(rows), frames=len(names[split]),
                             ids=len({r["pid"] for r in rows if r["pid"] > 0}),
                             query=len(query_rows), distractors=sum(r["pid"] == 0 for r in rows),
                             junk=sum(r["pid"] == -1 for r in rows))
    description = dict(version=VERSION, params=params, counts=counts)
    (root / "synthetic.json").write_text(json.dumps(description, indent=1) + "\n")
    return description


def _params_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def default_root(**params) -> Path:
    """The cache folder of the dataset with ``params`` (defaults: :data:`DEFAULTS`):
    ``$KEYPOINTOPS_CACHE`` (else ``~/.cache/keypointops``) ``/synthetic-v<VERSION>-<params hash>``."""
    params = _normalise_params(**{**DEFAULTS, **params})
    base = Path(os.environ.get("KEYPOINTOPS_CACHE") or Path.home() / ".cache" / "keypointops")
    return base / f"synthetic-v{VERSION}-{_params_key(params)}"


def ensure_synthetic(root: str | os.PathLike | None = None, *, progress: bool = True, workers: int = 2,
                     **params) -> Path:
    """The synthetic dataset's folder, generated on first use: ``root`` (default
    :func:`default_root`) is reused when it holds a complete dataset (``synthetic.json``; of the
    generator parameters ``params`` when any are given), else it is
    generated into a temporary sibling folder and renamed into place, so an interrupted or concurrent
    generation never leaves a partial dataset there."""
    root = Path(root) if root is not None else default_root(**params)
    if (root / "synthetic.json").is_file():
        if not params:  # a folder written by `keypointops synth`, whatever its parameters
            return root
        stored = json.loads((root / "synthetic.json").read_text())
        wanted = _normalise_params(**{**DEFAULTS, **params})
        if stored.get("version") != VERSION or stored.get("params") != wanted:
            raise ValueError(f"synthetic: {root} holds a dataset of other parameters or version "
                             f"({stored.get('version')}, {stored.get('params')}); asked for "
                             f"({VERSION}, {wanted}); remove it or choose another folder")
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"synthetic: {root} exists but holds no complete synthetic dataset "
                              f"(no synthetic.json); remove it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate(tmp, progress=progress, workers=workers, **params)
        if root.exists():
            root.rmdir()
        os.rename(tmp, root)
    except OSError:
        if (root / "synthetic.json").is_file():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root

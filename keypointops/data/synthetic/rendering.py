"""Rendering of the synthetic people: an articulated 3-D stick figure walking (joints from the gait
phase), its orthographic projection, drawing body part by body part in depth order, the keypoints
a pose estimator would give, and whole tracklets (detection jitter, occluders, camera colour cast)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from keypointops.data.synthetic.appearance import PALETTE, SCENE_WIDTH, Camera, Identity, _jitter, _rgb

__all__ = ["render_tracklet", "Framing"]


@dataclass(frozen=True)
class Framing:
    """How a tracklet's detection boxes frame the person (fractions of the crop's height / width).

    ``height``: the person's height (None: the identity's stature, about 0.86); ``feet``: where the
    feet are (1 is the bottom edge; above 1 the box cuts the feet off, and a tall person with high
    feet loses the head); ``shift``: the person's horizontal offset from the centre; ``jitter``: the
    per-frame box jitter (position and scale) relative to the default detector's; ``view``: a
    viewing angle replacing the camera's (radians, 0 = walking toward the camera), or None."""

    height: float | None = None
    feet: float = 0.965
    shift: float = 0.0
    jitter: float = 1.0
    view: float | None = None

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


class _Pose:
    """A person's 3-D joints at one instant and their 2-D image points under a projection."""

    def __init__(self, joints: dict, proj: _Projection):
        self.joints, self.proj, self.scale = joints, proj, proj.scale
        self.uv = {name: proj.uv(p) for name, p in joints.items() if name != "head_r"}


def _draw_leg(canvas: _Canvas, person: Identity, pose: _Pose, side: str) -> None:
    """Thigh and shin (trousers, or skin below shorts / a skirt) and the shoe."""
    uv, s = pose.uv, pose.scale
    hip, knee, ankle = uv[f"{side}_hip"], uv[f"{side}_knee"], uv[f"{side}_ankle"]
    width = 0.085 * person.build * s
    if person.lower_style == "trousers":
        trousers = person.accent if person.accent_on == f"{side}_leg" else person.lower
        canvas.limb(hip, knee, width, trousers)
        canvas.limb(knee, ankle, width * 0.9, trousers)
    else:
        canvas.limb(knee, ankle, width * 0.75, person.skin)
        mid = tuple(h + 0.55 * (k - h) for h, k in zip(hip, knee))
        canvas.limb(mid, knee, width * 0.8, person.skin)
        canvas.limb(hip, mid, width * 1.05, person.lower)
    forward = 0.05 * s * pose.proj.s
    canvas.disc((ankle[0] + forward * 0.5, ankle[1]), 0.035 * s, person.shoes)


def _draw_arm(canvas: _Canvas, person: Identity, pose: _Pose, side: str) -> None:
    """Upper arm and forearm (sleeve, or skin below a short sleeve) and the hand."""
    uv, s = pose.uv, pose.scale
    sho, elb, wri = uv[f"{side}_shoulder"], uv[f"{side}_elbow"], uv[f"{side}_wrist"]
    width = 0.06 * person.build * s
    sleeve = person.top2 if person.pattern == "jacket" else person.top
    if person.accent_on == f"{side}_arm":
        sleeve = person.accent
    if person.short_sleeves:
        mid = tuple(a + 0.5 * (e - a) for a, e in zip(sho, elb))
        canvas.limb(mid, elb, width * 0.8, person.skin)
        canvas.limb(elb, wri, width * 0.75, person.skin)
        canvas.limb(sho, mid, width, sleeve)
    else:
        canvas.limb(sho, elb, width, sleeve)
        canvas.limb(elb, wri, width * 0.9, sleeve)
    canvas.disc(wri, 0.025 * s, person.skin)


def _draw_torso(canvas: _Canvas, person: Identity, pose: _Pose) -> None:
    """The torso box's outline with the top's pattern, and a skirt over the hips."""
    joints, proj, s = pose.joints, pose.proj, pose.scale
    depth = 0.05 * person.build
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
    if person.waist > 0:
        canvas.polygon(_clip(poly, 1, bottom_y - person.waist * height, bottom_y), person.lower)
    if person.lower_style == "skirt":
        hips = [proj.uv(joints[f"{sd}_hip"] + np.array([0, -0.02, 0])) for sd in ("l", "r")]
        knees = [proj.uv(joints[f"{sd}_hip"] + np.array([1.6 * (j[0]), -0.2, 0]))
                 for sd, j in (("l", joints["l_hip"]), ("r", joints["r_hip"]))]
        canvas.polygon(_hull(hips + knees + [proj.uv(joints["l_hip"] + np.array([0, -0.02, 0.05])),
                                             proj.uv(joints["r_hip"] + np.array([0, -0.02, -0.05]))]),
                       person.lower)


def _draw_backpack(canvas: _Canvas, person: Identity, pose: _Pose) -> None:
    """A backpack: a box behind the upper back."""
    joints, proj = pose.joints, pose.proj
    narrow = np.array([0.8, 1, 1])
    corners = [proj.uv(joints[f"{side}_shoulder"] * narrow + offset)
               for offset in (np.array([0, -0.02, -0.07]), np.array([0, -0.2, -0.12]), np.array([0, -0.2, -0.05]))
               for side in ("l", "r")]
    canvas.polygon(_hull(corners), person.bag)


def _side_bag_box(person: Identity, joints: dict, side: str) -> list[np.ndarray]:
    """The 3-D corners of a bag hanging beside the hip on ``side``."""
    hip = joints[f"{side}_hip"]
    x = hip[0] + np.sign(hip[0]) * (0.05 * person.build + 0.035)
    return [np.array([x + dx, hip[1] + dy, dz]) for dx in (-0.03, 0.03) for dy in (0.07, -0.09)
            for dz in (-0.06, 0.06)]


def _draw_side_bag(canvas: _Canvas, person: Identity, pose: _Pose, side: str) -> None:
    """A shoulder bag beside the hip on ``side``."""
    canvas.polygon(_hull([pose.proj.uv(p) for p in _side_bag_box(person, pose.joints, side)]), person.accent)


def _draw_head(canvas: _Canvas, person: Identity, pose: _Pose) -> None:
    """Face, hair (behind or in front of the face by the viewing angle) and an optional hat."""
    proj = pose.proj
    r = pose.joints["head_r"] * pose.scale
    centre = pose.uv["head"]
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


def _draw_person(canvas: _Canvas, person: Identity, joints: dict, proj: _Projection) -> None:
    """Draws the person's body parts in depth order (painter's algorithm: the farthest first)."""
    pose = _Pose(joints, proj)
    items = []  # (depth, draw function)
    for side in ("l", "r"):
        items.append((proj.depth(joints[f"{side}_hip"]) - 0.001,
                      lambda side=side: _draw_leg(canvas, person, pose, side)))
        items.append((proj.depth(joints[f"{side}_shoulder"]) + 0.5 * proj.depth(joints[f"{side}_wrist"]),
                      lambda side=side: _draw_arm(canvas, person, pose, side)))
    items.append((0.0, lambda: _draw_torso(canvas, person, pose)))
    if person.bag is not None:
        items.append((-0.12 * abs(proj.c) - 0.06 if proj.c > 0 else 0.12,
                      lambda: _draw_backpack(canvas, person, pose)))
    if person.accent_on in ("l_bag", "r_bag"):
        side = person.accent_on[0]
        centre = sum(_side_bag_box(person, joints, side)) / 8
        # In front of the torso and the legs when its side faces the camera, behind them otherwise.
        items.append((proj.depth(centre) + 0.02, lambda side=side: _draw_side_bag(canvas, person, pose, side)))
    items.append((0.2, lambda: _draw_head(canvas, person, pose)))
    for _, draw in sorted(items, key=lambda item: item[0]):
        draw()


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
                    with_masks: bool = False, framing: Framing = Framing()):
    """Renders one tracklet: ``(frames: list of PIL RGB images, keypoints float32 [length, 17, 3]
    in frame pixels (missing = 0), masks: list of PIL "L" person masks or None)``.

    ``junk`` renders a bad detection (the crop cuts the person off, as MARS's junk tracklets);
    ``framing`` (:class:`Framing`) places the person in the crop.
    """
    height, width = size
    view = camera.view if framing.view is None else framing.view
    theta = view + (math.pi if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.25)
    walk = math.sin(theta)  # sideways component: the background scrolls
    phase0 = rng.uniform(0, 2 * math.pi)
    bg_x = rng.uniform(width, (SCENE_WIDTH - 2) * width)
    jitter = np.zeros(3)
    stature = person.height if framing.height is None else framing.height
    base_scale = stature * height * rng.uniform(0.95, 1.05)
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
        jitter = 0.6 * jitter + rng.normal(0, 1, 3) * np.array([0.03 * width, 0.02 * height, 0.03]) * framing.jitter
        scale = base_scale * (1 + jitter[2])
        phase = phase0 + 2 * math.pi * person.cadence * t
        cx = width / 2 + framing.shift * width + jitter[0] + offset[0]
        feet = height * framing.feet + jitter[1] + offset[1] + (scale - base_scale) * 0.5
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

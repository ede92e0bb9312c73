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

The hard variant
----------------
On the default dataset fixed horizontal stripes are already aligned: the feet are at 0.965 of
the crop height and the person's height varies by about 5% across a person's tracklets, so the
hip moves about 2 px (at 128 x 64) within an identity (:func:`hip_spread`).  The knobs of
:func:`generate` (all off by default; :data:`HARD`, ``build_dataset("synthetic-hard")``,
``keypointops synth --hard``) make *where* a body part lands in the crop vary, so that only the
keypoints say where it is, and make identities differ only in where their colours are:

* ``person_height`` / ``feet`` / ``shift``: each tracklet's box frames the person loosely or
  tightly, high or low (cutting the feet, or the head, at the border), off-centre;
  ``box_jitter``: a shakier detector from frame to frame.  The hip then moves >= 15 px within an
  identity.
* ``families="placement"``: family members wear the same colours over the same areas and differ
  only in where they are: upper garment and (high-waisted) trousers of equal areas swapped, an
  accent colour on the left or the right sleeve, trouser leg or side bag.  A histogram of the
  person's pixels hardly separates them; a left/right-blind part histogram separates the swaps but
  not the sides.
* ``occluders``: more tracklets with an occluder (:data:`HARD`: half).
* ``gait_twins``: pairs of people of one appearance, different proportions and gait, seen from
  the side, for methods that use body shape and motion (pose-only branches); the description
  lists them (:func:`gait_twins`) so that an evaluation can be restricted to them.
* ``body_spread`` (not part of :data:`HARD`): how far apart people's proportions and gaits are,
  their ranges widened about their centres by this factor, for a stronger pose cue.

What the knobs do not model: a detector's failure modes that depend on the image (boxes locked on
a neighbour, two people in one box), the box's aspect ratio (the crop is always resized to the
same shape, the person never squashed), stature as a cue (with ``person_height`` the person's own
height is hidden by the box scale, as boxes rescaled to a fixed height hide it), appearance
changes of one person across cameras other than the colour cast (no change of clothes, no bag put
down), and gait twins seen from other viewing angles.

What it does not model
----------------------
Real textures, cloth folds and shading, faces, carried objects other than backpacks and side bags,
crowds (no second person overlapping the target except blob occluders), perspective, motion blur,
ID switches inside a tracklet, pose-estimator left/right swaps, illumination changes inside a
frame.  It measures what body-aligned methods are about (colour *placement*, shape, gait, part
occlusion) on easy appearance; it is no substitute for results on MARS.

Output: ``bbox_{train,test}/<pid4>/<pid4>C<cam>T<tracklet4>F<frame3>.jpg``, ``info/`` (names,
``tracks_*_info.mat``, ``query_IDX.mat``), ``bbox_{train,test}_keypoints/<pid4>/<frame>.pose``
(KMPNet format, pixels of the frame) and ``synthetic.json`` (the parameters that differ from
the neutral knobs, the counts, the gait twins).
Deterministic: the same parameters give byte-identical files.
"""
from __future__ import annotations

from keypointops.data.synthetic.appearance import Camera, Identity, make_camera, make_family, make_identity
from keypointops.data.synthetic.appearance import make_placement_family, make_placement_identity
from keypointops.data.synthetic.measures import hip_spread
from keypointops.data.synthetic.rendering import Framing, render_tracklet
from keypointops.data.synthetic.writing import (DEFAULTS, HARD, NEUTRAL, VERSION, default_root, ensure_synthetic,
                                                gait_twins, generate)

__all__ = ["VERSION", "DEFAULTS", "HARD", "NEUTRAL", "generate", "default_root", "ensure_synthetic", "gait_twins",
           "render_tracklet", "Framing", "make_family", "make_identity", "make_placement_family",
           "make_placement_identity", "make_camera", "Identity", "Camera", "hip_spread"]

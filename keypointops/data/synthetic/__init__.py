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

from keypointops.data.synthetic.appearance import Camera, Identity, make_camera, make_family, make_identity
from keypointops.data.synthetic.rendering import render_tracklet
from keypointops.data.synthetic.writing import DEFAULTS, VERSION, default_root, ensure_synthetic, generate

__all__ = ["VERSION", "DEFAULTS", "generate", "default_root", "ensure_synthetic", "render_tracklet",
           "make_family", "make_identity", "make_camera", "Identity", "Camera"]

"""What several test modules share: the devices and fused backends to test, tolerances per dtype,
and, for the model tests, one intra-op thread, synthetic clips and one optimisation step."""
import pytest
import torch

from keypointops._extension import has_cuda_ops, has_ops
from keypointops._opdefs.backend import triton_available
from keypointops.graphs import SKELETONS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends(device: str, op_name: str | None = None) -> list:
    """The fused backends that run on ``device`` here (for op ``op_name`` when given), each a
    pytest param with its skip reason."""
    compiled = pytest.param(device, marks=pytest.mark.skipif(
        not (has_cuda_ops(op_name) if device == "cuda" else has_ops()),
        reason=f"keypointops._C built without {device} kernels"))
    triton = pytest.param("triton", marks=pytest.mark.skipif(
        not triton_available(torch.device(device)), reason="triton not installed"))
    return [compiled, triton]


def device_backend_params(op_name: str | None = None):
    """(device, backend) pairs for parametrize: every fused backend on every device present (that
    has a compiled kernel of ``op_name`` when given)."""
    params = []
    for device in DEVICES:
        for backend in backends(device, op_name):
            params.append(pytest.param(device, backend.values[0], marks=backend.marks,
                                       id=f"{device}-{backend.values[0]}"))
    return params


def tolerances(dtype: torch.dtype) -> dict:
    return {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]


def optimisation_step(model, images, keypoints, pids, lr: float):
    """One real Adam step of ``model`` on a batch: returns (loss before, loss after). The RNG is
    re-seeded before each loss so that both see the same dropout masks and random choices."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss():
        torch.manual_seed(5)
        return model.loss(model(images, keypoints), pids)[0]
    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    return before.item(), after.item()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (two spin-wait on a busy 2-core machine, up to 6x slower).
    The model test modules import this fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def upright_keypoints(height: int, width: int) -> torch.Tensor:
    """COCO-17 keypoints ``[17, 3]`` of a person standing upright, facing the camera, filling an
    ``H x W`` frame (the person's right side on the image's left)."""
    cx = width / 2
    rows = {"nose": 0.08, "left_eye": 0.06, "right_eye": 0.06, "left_ear": 0.07, "right_ear": 0.07,
            "left_shoulder": 0.2, "right_shoulder": 0.2, "left_elbow": 0.35, "right_elbow": 0.35,
            "left_wrist": 0.48, "right_wrist": 0.48, "left_hip": 0.52, "right_hip": 0.52,
            "left_knee": 0.72, "right_knee": 0.72, "left_ankle": 0.92, "right_ankle": 0.92}
    spread = {"nose": 0, "eye": 0.04, "ear": 0.08, "shoulder": 0.2, "elbow": 0.25, "wrist": 0.27,
              "hip": 0.12, "knee": 0.12, "ankle": 0.12}
    points = []
    for name in SKELETONS["coco17"].joints:
        side, _, part = name.partition("_")
        dx = 0.0 if name == "nose" else spread[part] * width * (1 if side == "left" else -1)
        points.append([cx + dx, rows[name] * height, 1.0])
    return torch.tensor(points)


def clips(batch=4, frames=2, height=64, width=32, seed=0, dtype=torch.float32):
    """Random images and jittered upright-person COCO-17 keypoints (some joints missing), shaped
    like the data loader's batches; 2 clips per identity.  Shared by the model tests."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, frames, 3, height, width, generator=g, dtype=dtype)
    keypoints = upright_keypoints(height, width).to(dtype).repeat(batch, frames, 1, 1)
    keypoints[..., :2] += torch.randn(batch, frames, 17, 2, generator=g, dtype=dtype) * 2
    keypoints[..., 2] = (torch.rand(batch, frames, 17, generator=g, dtype=dtype) > 0.15).to(dtype)
    pids = torch.arange(batch // 2).repeat_interleave(2)
    return images, keypoints, pids

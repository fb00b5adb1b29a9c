"""Shared fixtures: tiny diffusers reference models and torch <-> Flax plumbing for parity tests."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU's LLVM backend at -O0: the tests' programs are tiny, their compilation is most of CI's time
# (measured on the tiny SF-V generator step: 25.4 s -> 15.7 s), and what they check (parity at 1e-4,
# bitwise equalities between runs of the same programs) does not depend on LLVM's optimisation level.
# Subprocesses inherit it (it is part of the compilation cache key).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# One persistent XLA cache per test session, shared with the subprocesses the tests start: the training
# tests compile the same tiny steps in-process and in CLI runs (about 2 minutes cold, seconds warm).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sfv_jax_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import linen as nn  # noqa: E402

from sfv_jax.checkpoint import convert  # noqa: E402
from sfv_jax.models import presets
from sfv_jax.testing import torch_reference as ref  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

PARITY_TOL = 1e-4  # max|jax - torch| / max|torch|, fp32
BF16_TOL = 3e-2  # bf16 compute against the fp32 reference


def xla_flags_with(devices: int | None = None, *extra: str) -> str:
    """This process's ``XLA_FLAGS`` (conftest's -O0 included) for a subprocess: any device count replaced
    by ``devices`` (none if None), each flag of ``extra`` present once."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith(("--xla_force_host_platform_device_count=", *extra))
    ]
    flags.extend(extra)
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


# The few tests bound by run time rather than compilation (tens of training steps, 25-step sampling, I3D at
# 224 px) run that work in a subprocess at XLA's usual -O2 instead of the -O0 above. Measured on this 2-core
# machine (CPU seconds, cold cache): the diffusion run's two tests 312 at -O0 against 138 at -O2, the toy
# teacher's report 358 against 266; compilation-bound tests go the other way (the parity and pipeline
# files 236 at -O0 against 290 at -O2).
def run_time_bound_env(devices: int | None = None, *extra: str) -> dict[str, str]:
    """``os.environ`` for a subprocess at XLA's -O2 (see above), with ``xla_flags_with(devices, *extra)``."""
    flags = [f for f in xla_flags_with(devices, *extra).split() if not f.startswith("--xla_backend_optimization_level")]
    return {**os.environ, "XLA_FLAGS": " ".join([*flags, "--xla_backend_optimization_level=2"])}


def tensorboard_scalars(workdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalar summaries in ``workdir``'s TensorBoard event files."""
    import tensorflow as tf

    out: dict[str, dict[int, float]] = {}
    for path in workdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                if v.HasField("tensor") and v.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
    return out


def to_host(tree):
    """A pytree of device arrays as numpy copies."""
    return jax.tree.map(lambda x: np.array(x), tree)


def trees_equal(a, b) -> bool:
    """Same structure, every leaf bitwise equal."""
    la, lb = jax.tree.leaves(to_host(a)), jax.tree.leaves(to_host(b))
    return all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def all_finite(tree) -> bool:
    """No NaN or infinity in any floating leaf."""
    return all(np.isfinite(x).all() for x in jax.tree.leaves(to_host(tree)) if np.issubdtype(x.dtype, np.floating))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def flax_params_from_torch(torch_module, flax_module, *flax_inputs, dtype=np.float32) -> dict:
    """Convert ``torch_module``'s weights with our converter onto ``flax_module``'s parameter tree."""
    abstract = jax.eval_shape(lambda: flax_module.init(jax.random.PRNGKey(0), *flax_inputs))["params"]
    state = {k: v.detach().cpu().numpy() for k, v in torch_module.state_dict().items()}
    return convert.torch_to_flax(state, nn.meta.unbox(abstract), dtype=dtype, progress=False)


def video_to_torch(x: np.ndarray) -> torch.Tensor:
    """[B, F, H, W, C] -> torch (B*F, C, H, W), frame index fastest."""
    b, f, h, w, c = x.shape
    return torch.from_numpy(np.ascontiguousarray(x.reshape(b * f, h, w, c).transpose(0, 3, 1, 2)))


def video_from_torch(t: torch.Tensor, batch: int) -> np.ndarray:
    """torch (B*F, C, H, W) -> [B, F, H, W, C]."""
    x = t.detach().numpy().transpose(0, 2, 3, 1)
    return x.reshape(batch, -1, *x.shape[1:])


@pytest.fixture(scope="session")
def tiny_unets():
    """name -> randomised diffusers UNet (built once per session)."""
    return {
        name: ref.build_unet(cfg, seed=i)
        for i, (name, cfg) in enumerate((n, presets.UNETS[n]) for n in presets.UNET_TEST_SHAPES)
    }


@pytest.fixture(scope="session")
def tiny_unet_dirs(tiny_unets, tmp_path_factory):
    """name -> diffusers folder (config.json + safetensors) of each tiny UNet."""
    root = tmp_path_factory.mktemp("diffusers_unets")
    return {name: ref.save_unet(m, root / name) for name, m in tiny_unets.items()}


@pytest.fixture(scope="session")
def tiny_pipeline_dirs(tmp_path_factory):
    """(diffusers StableVideoDiffusionPipeline of tiny random components, its saved folder, the converted folder)."""
    root = tmp_path_factory.mktemp("svd_pipeline")
    pipe = ref.build_pipeline()
    src = ref.save_pipeline(pipe, root / "diffusers")
    out = convert.convert_folder(src, root / "converted", progress=False)
    return pipe, src, out


@pytest.fixture(scope="session")
def jax_pipeline(tiny_pipeline_dirs):
    """The JAX pipeline loaded from the converted tiny folder (shared: its compiled stages are reused)."""
    from sfv_jax.checkpoint import pretrained

    return pretrained.load_pipeline(tiny_pipeline_dirs[2], progress=False)


@pytest.fixture(scope="session")
def tiny_folder_dataset(tmp_path_factory):
    """A folder dataset built from 5 synthetic mp4s (10 fps, 24x32, 2-4 s) at the tiny config's 16x16, 7 fps."""
    from sfv_jax.data import folder, video_io
    from sfv_jax.data.synthetic import synthetic_clip

    root = tmp_path_factory.mktemp("tiny_videos")
    for i in range(5):
        video_io.write_video(root / "videos" / f"v{i}.mp4", synthetic_clip(i, 0, 20 + 4 * i, 24, 32), fps=10)
    folder.build_folder_dataset(root / "videos", root / "clips", fps=7, height=16, width=16, min_frames=4)
    return root / "clips"


# The slowest files first, so that two xdist workers (``pytest -n 2 --dist loadgroup``, what CI runs)
# start the long subprocess tests at once and finish together; the rest fills in behind them. Within a
# file the order is unchanged. (The layout test's installed copy trains the tiny config last, when the
# shared compilation cache already holds its steps.)
SLOW_FIRST = (
    "test_sharding.py",
    "test_toy_teacher.py",  # one 100-step SF-V distillation and its report (about 8 minutes on one core)
    "test_training.py",
    "test_train_steps.py",
    "test_diffusion_objective.py",
    "test_evaluate.py",
    "test_device_check.py",
    "test_pipeline.py",
    "test_entry_points.py",
)
LAST = ("test_layout.py",)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        if name in SLOW_FIRST:
            return SLOW_FIRST.index(name)
        return len(SLOW_FIRST) + (1 if name in LAST else 0)

    items.sort(key=rank)  # stable: the order inside a file is kept

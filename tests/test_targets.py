"""Compiling for the hardware the project runs on, from this CPU: the attention kernel chosen per call, the
named targets and their topologies, the paper's UNet settings compiled by XLA:GPU for an H100 (cuDNN flash
attention where cuDNN supports the call), and the tiny configs' programs compiled for a GPU and a TPU
target. The compilers are the ``targets`` extra's (``launch/setup.sh --dev`` installs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import run_time_bound_env

from sfv_jax.models.attention import attention_kernel, cudnn_supports
from sfv_jax.parallel import targets

REPO = Path(__file__).resolve().parents[1]
BF16 = jnp.bfloat16


def test_attention_kernel_is_chosen_per_call():
    """cuDNN is a preference: honoured on a GPU where cuDNN's flash kernel compiles (SVD's spatial
    self-attention), the exact portable kernels elsewhere (cross-attention to one key, SVD-XT's 25
    frames, float32, any CPU or TPU)."""
    spatial, cross, temporal, temporal_xt = (5376, 5376), (5376, 1), (14, 14), (25, 25)
    assert attention_kernel("cudnn", *spatial, 64, BF16, "gpu") == "cudnn"
    assert attention_kernel("cudnn", *temporal, 64, BF16, "gpu") == "cudnn"
    assert attention_kernel("cudnn", *cross, 64, BF16, "gpu") == "xla"  # one key: [T, 1] scores
    assert attention_kernel("cudnn", *temporal_xt, 64, BF16, "gpu") == "xla"  # odd length
    assert attention_kernel("cudnn", *spatial, 64, jnp.float32, "gpu") == "chunked"  # fp32: no flash kernel
    assert attention_kernel("cudnn", *spatial, 64, BF16, "cpu") == "chunked"
    assert attention_kernel("cudnn", *spatial, 64, BF16, "tpu") == "chunked"
    assert attention_kernel(None, *spatial, 64, BF16, "cpu") == "chunked"
    assert attention_kernel(None, *spatial, 64, BF16, "gpu") == "xla"
    assert attention_kernel("xla", *spatial, 64, BF16, "cpu") == "xla"
    assert not cudnn_supports(5376, 5376, 60, BF16)  # head dim not a multiple of 8
    with pytest.raises(ValueError, match="flash"):
        attention_kernel("flash", *spatial, 64, BF16, "gpu")


def test_targets_and_topologies():
    """Targets are data; a mesh's size picks the topology (GPUs: hosts of 8; TPUs: the slice's name)."""
    assert targets.get("v5p").tpu_topology(8) == "v5p:2x2x2"
    assert targets.get("v5p").tpu_topology(4) == "v5p:2x2x1"
    assert targets.get("v6e").tpu_topology(8) == "v6e:2x4"
    assert targets.get("v5e").tpu_topology(16) == "v5e:4x4"
    with pytest.raises(targets.TargetError, match="power of two"):
        targets.get("v6e").tpu_topology(12)
    with pytest.raises(targets.TargetError, match="not one of"):
        targets.get("h800")
    h100 = targets.topology("h100", 16)
    assert len(h100) == 16 and {d.process_index for d in h100} == {0, 1}  # two hosts of 8
    assert h100[0].device_kind == "NVIDIA H100 80GB HBM3" and h100[0].platform == "gpu"
    v5p = targets.topology("v5p", 8)
    assert len(v5p) == 8 and v5p[0].platform == "tpu"
    with pytest.raises(targets.TargetError, match="at least 4 chips"):
        targets.topology("v6e", 2)


def test_paper_unet_settings_compile_for_h100():
    """The UNet as the paper's config trains it (bf16, full remat, cuDNN attention preferred), its
    gradient compiled by XLA:GPU for an H100: the spatial self-attention runs cuDNN's fused flash kernel,
    the cross-attention to the one CLIP token does not (cuDNN refuses a key length of 1, which crashed the
    paper's config at its first step)."""
    from sfv_jax.models import presets
    from sfv_jax.models.build import abstract_params, unet_from_config
    from sfv_jax.models.unet import init_inputs

    unet = unet_from_config(presets.UNETS["toy"], dtype=BF16, remat_policy="full", attention_impl="cudnn")
    mesh = jax.sharding.Mesh(targets.topology("h100", 1), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), t)
    args = init_inputs(unet.config, batch=1, height=16, width=16)  # 256 tokens per frame, 4 frames

    def loss(params, *a):
        return unet.apply({"params": params}, *a).astype(jnp.float32).mean()

    compiled = targets.compile(jax.jit(jax.grad(loss)), abstract(abstract_params(unet)), *abstract(args), mesh=mesh)
    hlo = compiled.as_text()
    assert "__cudnn$fmha" in hlo  # the flash kernel, forward and backward
    assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.parametrize(
    ("target", "mesh", "flags", "steps"),
    [
        ("h100", "fsdp=8", ("--config.loss.distill_weight=1.0",), ("g_grads", "d_update", "heldout")),
        ("v5p", "fsdp=4", ("--config.objective=diffusion",), ("g_grads",)),
    ],
)
def test_tiny_config_compiles_for_targets(target, mesh, flags, steps):
    """``sfv-memory --target``: the tiny config's generator step (SF-V's on a GPU target: UNet, heads and
    losses, with the teacher term too, so the whole frozen teacher's guided pass; the diffusion objective's on
    a TPU target), SF-V's discriminator update (its scalar arguments
    passed abstract, replicated on the target's mesh: 8 s) and its held-out grip, compiled by the target's
    compiler, per-device figures from it, the target's memory as the limit, the last line the peak. (The other steps and
    configs compile in ``sfv-targets``'s table; here the compile time is CI's. At XLA's usual -O2: the GPU
    compiler's LLVM is slower at the suite's -O0.)"""
    cmd = [sys.executable, "-m", "sfv_jax.cli.memory", "--config", "tiny", "--target", target, "--mesh", mesh]
    proc = subprocess.run(
        [*cmd, "--steps", ",".join(steps), *flags],
        cwd=REPO,
        env=run_time_bound_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    kind = targets.get(target).kind
    assert f"({kind} compile)" in proc.stdout and f"in {targets.get(target).memory_gb:g} GB" in proc.stdout
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.split() and ln.split()[0] in steps}
    assert set(rows) == set(steps)
    peak = int(lines[-1].removeprefix("peak_bytes_per_device="))
    assert 0 < peak < 1e9 and abs(max(float(r[5]) for r in rows.values()) * 1e9 - peak) < 1e6
    if targets.get(target).platform == "tpu":  # libtpu reports FLOPs
        assert all(float(r[6]) >= 0 for r in rows.values())


def test_fsdp_keeps_each_devices_samples_in_attention():
    """One spatio-temporal transformer at SVD's first-level width (320 channels, 5 heads, 14 frames),
    forward and backward, 8 samples over fsdp=8 (every weight split over the same axis as the batch),
    partitioned by the TPU compiler: the weights are gathered, never the samples (an all-gather of the
    [B, F, T, C] hidden states multiplied activation memory by 8 on every backend), and every projection
    multiplies one sample's tokens."""
    import re

    import flax.linen as nn

    from sfv_jax.models.attention import TransformerSpatioTemporal
    from sfv_jax.parallel import sharding

    plan = sharding.Plan(sharding.make_mesh({"fsdp": 8}, targets.topology("v5p", 8)))
    block = TransformerSpatioTemporal(heads=5, dtype=BF16, attention_impl="xla")
    x, ctx = jnp.zeros((8, 14, 8, 8, 320), BF16), jnp.zeros((8, 1, 1024), BF16)
    boxed = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), x[:1], ctx[:1]))["params"]
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(boxed),
        plan.param_shardings(boxed),
    )
    split = plan.batch_sharding(0)
    inputs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=split) for a in (x, ctx)]

    def loss(p, x, c):
        return block.apply({"params": p}, x, c).astype(jnp.float32).mean()

    hlo = targets.compile(jax.jit(jax.grad(loss)), params, *inputs, mesh=plan.mesh, rules=plan.rules).as_text()
    gathered = [tuple(map(int, s.split(","))) for s in re.findall(r"= \w+\[([\d,]+)\][^ ]* all-gather", hlo)]
    assert gathered and all(len(s) <= 3 for s in gathered), sorted(set(gathered))  # weights, no [B, F, T, C]
    assert "[8,14,64,320]" not in hlo and "[8,64,14,320]" not in hlo  # no device holds every sample


def test_missing_target_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(targets, "compiler_installed", lambda t: False)
    with pytest.raises(targets.TargetError, match=r"not installed; pip install -e '\.\[targets\]'"):
        targets.topology("a100", 8)


@pytest.mark.parametrize("target", ["h100", "v5p"])
def test_spectrally_normalised_heads_compile_for_targets(target):
    """The discriminator heads at the paper's size with ``spectral_norm`` (power iterations and the
    normalised kernels inside the gradient), 4 samples split over 4 devices, compiled by the target's
    compiler: measured 7.5 s (H100) and 5.6 s (v5p), 12.1 MB and 3.9 MB of temporaries per device."""
    import flax.linen as nn

    from sfv_jax.parallel import sharding
    from sfv_jax.training.discriminator import DiscriminatorHeads

    plan = sharding.Plan(sharding.make_mesh({"data": 4}, targets.topology(target, 4)))
    heads = DiscriminatorHeads("both", channels=128, proj_dim=64, groups=32, spectral_norm=True)
    split, whole = plan.batch_sharding(0), jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec())
    feats = jax.ShapeDtypeStruct((4, 14, 8, 8, 320), BF16, sharding=split)
    emb = jax.ShapeDtypeStruct((4, 1024), jnp.float32, sharding=split)
    sigma = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=split)
    params = jax.eval_shape(
        lambda f, e, s: nn.meta.unbox(heads.init(jax.random.PRNGKey(0), [f], e, s)["params"]), feats, emb, sigma
    )
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), params)

    def loss(p, f, e, s):
        return sum(jnp.mean(o) for o in heads.apply({"params": p}, [f], e, s))

    compiled = targets.compile(jax.jit(jax.grad(loss)), params, feats, emb, sigma, mesh=plan.mesh, rules=plan.rules)
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_guided_sfv_sampler_compiles_for_h100():
    """``sfv-memory --sampler`` with ``sample.sfv_guidance``: SF-V's one step with the teacher's guidance
    (the batch doubled in one UNet call), the tiny config's, compiled by XLA:GPU for one H100 (measured 12 s
    at -O2, 9.9 MB against the unguided step's 9.5 MB)."""
    from sfv_jax.configs import tiny
    from sfv_jax.training.memory_plan import plan_sampler

    config = tiny.get_config()
    config.sample.sfv_guidance = True
    record = plan_sampler(config, target="h100", log=lambda *a: None)
    assert list(record["steps"]) == ["sample_sfv1_guided"] and record["device_kind"].startswith("NVIDIA H100")
    assert record["peak_bytes_per_device"] > 0

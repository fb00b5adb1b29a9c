"""Converter: round trip diffusers -> Flax -> diffusers (bit-exact), variants, sharded files, CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import PARITY_TOL, rel_err

from sfv_jax.checkpoint import components, convert, pretrained
from sfv_jax.checkpoint.safetensors_io import SafetensorsFile, open_weights, save_file
from sfv_jax.models import presets
from sfv_jax.testing import torch_reference as ref


def test_torch_key_names():
    assert (
        convert.torch_key(("down_blocks_0", "resnets_1", "conv1", "kernel")) == "down_blocks.0.resnets.1.conv1.weight"
    )
    assert convert.torch_key(("time_embedding", "linear_1", "kernel")) == "time_embedding.linear_1.weight"
    assert (
        convert.torch_key(("x", "transformer_blocks_0", "ff", "net_0", "proj", "bias"))
        == "x.transformer_blocks.0.ff.net.0.proj.bias"
    )
    assert convert.torch_key(("attn1", "to_out_0", "kernel")) == "attn1.to_out.0.weight"
    assert convert.torch_key(("norm", "scale")) == "norm.weight"
    assert convert.torch_key(("time_mixer", "mix_factor")) == "time_mixer.mix_factor"


def test_reader_matches_safetensors_library(tiny_unet_dirs):
    path = tiny_unet_dirs["tiny_a"] / "diffusion_pytorch_model.safetensors"
    ours, theirs = SafetensorsFile(path), safetensors.numpy.load_file(str(path))
    assert set(ours.shapes) == set(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours.get(k), v)


def test_round_trip_is_bit_exact_and_diffusers_loads_it(tiny_unet_dirs, tiny_unets, tmp_path):
    src = tiny_unet_dirs["tiny_b"]
    converted = convert.convert_folder(src, tmp_path / "flax", progress=False)
    exported = convert.export_folder(converted, tmp_path / "exported")
    original = safetensors.numpy.load_file(str(src / "diffusion_pytorch_model.safetensors"))
    again = safetensors.numpy.load_file(str(exported / "diffusion_pytorch_model.safetensors"))
    assert set(original) == set(again)
    for k in original:
        assert original[k].dtype == again[k].dtype and original[k].tobytes() == again[k].tobytes(), k
    assert json.loads((exported / "config.json").read_text())["_class_name"] == "UNetSpatioTemporalConditionModel"

    from diffusers import UNetSpatioTemporalConditionModel

    reloaded = ref.load_aligned(UNetSpatioTemporalConditionModel, exported)
    inputs = ref.unet_inputs(presets.UNETS["tiny_b"], *presets.UNET_TEST_SHAPES["tiny_b"], seed=5)
    np.testing.assert_array_equal(ref.unet_forward(reloaded, *inputs), ref.unet_forward(tiny_unets["tiny_b"], *inputs))


def test_converted_checkpoint_loads_same_params(tiny_unet_dirs, tmp_path):
    src = tiny_unet_dirs["tiny_a"]
    out = convert.convert_folder(src, tmp_path / "flax", progress=False)
    meta = json.loads((out / components.META_FILE).read_text())
    assert meta["component"] == "unet" and meta["num_tensors"] > 0
    assert not list(tmp_path.glob(".flax.tmp-*"))  # staging folder renamed away
    _, direct = pretrained.load_unet(src, progress=False)
    _, restored = pretrained.load_unet(out)
    jax.tree.map(np.testing.assert_array_equal, direct, restored)
    # a pipeline folder (model_index.json + unet/) is accepted too
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "pipe" / "unet").symlink_to(src, target_is_directory=True)
    _, via_pipeline = pretrained.load_unet(tmp_path / "pipe", progress=False)
    jax.tree.map(np.testing.assert_array_equal, direct, via_pipeline)


def test_fp16_variant_and_bf16_params(tiny_unets, tiny_unet_dirs, tmp_path):
    folder = tmp_path / "fp16"
    copy.deepcopy(tiny_unets["tiny_a"]).to(torch.float16).save_pretrained(str(folder), variant="fp16")
    assert (folder / "diffusion_pytorch_model.fp16.safetensors").exists()
    model, params = pretrained.load_unet(folder, progress=False)  # picks the fp16 variant, casts to fp32
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    _, full = pretrained.load_unet(tiny_unet_dirs["tiny_a"], progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3), params, full)
    _, bf16 = pretrained.load_unet(folder, param_dtype=jnp.bfloat16, progress=False)
    assert {p.dtype for p in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    # bf16 tensors survive export (safetensors BF16) and re-reading
    out = convert.export_diffusers(bf16, presets.UNETS["tiny_a"], tmp_path / "bf16_export")
    reread = SafetensorsFile(out / "diffusion_pytorch_model.safetensors")
    assert {str(reread.dtype(k)) for k in reread.shapes} == {"bfloat16"}


def test_sharded_checkpoint(tiny_unet_dirs, tiny_unets, tmp_path):
    folder = tmp_path / "sharded"
    tiny_unets["tiny_a"].save_pretrained(str(folder), max_shard_size="20KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(folder.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    _, sharded = pretrained.load_unet(folder, progress=False)
    _, single = pretrained.load_unet(tiny_unet_dirs["tiny_a"], progress=False)
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_cli_convert_export_and_parity(tiny_unet_dirs, tiny_unets, tmp_path):
    src = tiny_unet_dirs["tiny_a"]
    run = lambda *a: subprocess.run([sys.executable, "-m", "sfv_jax.cli.convert", *a], capture_output=True, text=True)
    res = run("--src", str(src), "--out", str(tmp_path / "c"))
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout
    res = run("--src", str(src), "--out", str(tmp_path / "c"))  # refuses to overwrite
    assert res.returncode == 2 and "already exists" in res.stderr and "--overwrite" in res.stderr
    res = run("--src", str(src), "--out", str(tmp_path / "c"), "--overwrite")
    assert res.returncode == 0, res.stderr
    res = run("--to-diffusers", "--src", str(tmp_path / "c"), "--out", str(tmp_path / "d"))
    assert res.returncode == 0, res.stderr
    model, params = pretrained.load_unet(tmp_path / "c")
    inputs = ref.unet_inputs(presets.UNETS["tiny_a"], *presets.UNET_TEST_SHAPES["tiny_a"], seed=6)
    got = jax.jit(model.apply)({"params": params}, *map(jnp.asarray, inputs))
    assert rel_err(got, ref.unet_forward(tiny_unets["tiny_a"], *inputs)) <= PARITY_TOL


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "w.safetensors"

    with pytest.raises(Exception):  # noqa: B017 (safetensors' own error type)
        save_file(path, {"a": np.ones(3, np.float32), "b": np.ones(2, np.complex64)})
    assert not path.exists() and not list(tmp_path.iterdir())
    save_file(path, {"a": np.arange(3, dtype=np.float32)})
    assert open_weights(path)["a"].tolist() == [0.0, 1.0, 2.0]

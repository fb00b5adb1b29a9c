"""Bad inputs to the converter / loader: each gives one clear error that names the problem."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from sfv_jax.checkpoint import pretrained
from sfv_jax.checkpoint.safetensors_io import CheckpointError, open_weights, save_file
from sfv_jax.cli import convert as convert_cli
from sfv_jax.models import presets

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def folder(tiny_unet_dirs, tmp_path):
    dst = tmp_path / "unet"
    shutil.copytree(tiny_unet_dirs["tiny_a"], dst)
    return dst


def _rewrite(folder, edit):
    tensors = dict(open_weights(folder))
    tensors = {k: np.array(v) for k, v in tensors.items()}
    edit(tensors)
    save_file(folder / WEIGHTS, tensors)


def test_missing_key(folder):
    _rewrite(folder, lambda t: t.pop("down_blocks.0.resnets.0.spatial_res_block.conv1.weight"))
    with pytest.raises(
        CheckpointError, match=r"1 missing.*\n.*missing: down_blocks\.0\.resnets\.0\.spatial_res_block\.conv1\.weight"
    ):
        pretrained.load_unet(folder, progress=False)


def test_unexpected_key(folder):
    _rewrite(folder, lambda t: t.update({"extra.layer.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected: extra\.layer\.weight"):
        pretrained.load_unet(folder, progress=False)


def test_wrong_shape(folder):
    key = "conv_in.weight"
    _rewrite(folder, lambda t: t.update({key: np.zeros((32, 8, 5, 5), np.float32)}))
    with pytest.raises(
        CheckpointError,
        match=r"wrong shape: conv_in\.weight: checkpoint \[32, 8, 5, 5\], model expects \[32, 8, 3, 3\]",
    ):
        pretrained.load_unet(folder, progress=False)


def test_all_problems_reported_together(folder):
    def edit(t):
        t.pop("conv_out.bias")
        t["bogus"] = np.zeros(1, np.float32)
        t["conv_in.bias"] = np.zeros(7, np.float32)

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError) as err:
        pretrained.load_unet(folder, progress=False)
    msg = str(err.value)
    assert "1 missing, 1 unexpected, 1 wrong shape" in msg
    assert "conv_out.bias" in msg and "bogus" in msg and "conv_in.bias" in msg


def test_config_that_does_not_fit_the_weights(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layers_per_block"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the model config"):
        pretrained.load_unet(folder, progress=False)


def test_path_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: does not exist"):
        pretrained.load_unet(tmp_path / "nowhere")
    assert convert_cli.main(["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        pretrained.load_unet(folder)


def test_no_weights_in_folder(folder):
    (folder / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=r"no weights found: expected diffusion_pytorch_model\.safetensors"):
        pretrained.load_unet(folder)


@pytest.mark.parametrize("how", ["truncated", "garbage", "bad_json"])
def test_corrupt_safetensors(folder, tmp_path, how):
    path = folder / WEIGHTS
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
        pattern = r"corrupt or truncated safetensors file: tensor '.*' .* claims bytes"
    elif how == "garbage":
        path.write_bytes(b"\xff" * 64)
        pattern = "corrupt safetensors file \\(header length"
    else:
        path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 16)
        pattern = "header is not JSON"
    with pytest.raises(CheckpointError, match=pattern) as err:
        pretrained.load_unet(folder, progress=False)
    assert WEIGHTS in str(err.value)
    assert convert_cli.main(["--src", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt"])
def test_pickled_checkpoint_refused(folder, suffix):
    (folder / WEIGHTS).unlink()
    pickled = folder / f"diffusion_pytorch_model{suffix}"
    pickled.write_bytes(pickle.dumps({"never": "unpickled"}))
    for target in (folder, pickled):
        with pytest.raises(CheckpointError, match=r"refusing to load a pickled checkpoint.*safetensors") as err:
            open_weights(target)
        assert pickled.name in str(err.value)


def test_non_svd_config_rejected(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        pretrained.load_unet(folder)


def test_config_dict_ignores_unused_keys():
    model = pretrained.unet_from_config(
        {**presets.UNETS["tiny_a"], "_diffusers_version": "0.42.1", "sample_size": 8, "some_future_key": 1}
    )
    assert model.config.block_out_channels == (32, 64)
    with pytest.raises(ValueError, match="num_attention_heads"):
        pretrained.unet_from_config({**presets.UNETS["tiny_a"], "num_attention_heads": [1, 2, 3]})


def test_bad_weight_values_refused_through_the_cli(folder, tmp_path, capsys):
    """Non-finite values, an int8 tensor where the model has floats and values beyond float16's range are
    refused, each tensor named, exit 2, nothing written (otherwise they would convert and sample silently)."""

    def edit(t):
        t["conv_in.weight"][0, 0, 0, 0] = np.nan
        t["conv_in.bias"] = t["conv_in.bias"].astype(np.int8)
        t["conv_out.bias"][0] = np.inf
        t["conv_out.weight"][0, 0, 0, 0] = 1e6

    _rewrite(folder, edit)
    out = tmp_path / "converted"
    assert convert_cli.main(["--src", str(folder), "--out", str(out), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "4 weight tensor(s) refused" in err, err
    assert "conv_in.weight: 1 of" in err and "not finite" in err
    assert "conv_in.bias: int8 tensor where the model has float weights" in err
    assert "conv_out.bias: 1 of" in err
    assert "conv_out.weight: values up to 1e+06 do not fit float16" in err
    assert not out.exists()
    # the same checks when the folder is loaded directly (a training run's init_from)
    with pytest.raises(CheckpointError, match="conv_in.weight: 1 of"):
        pretrained.load_unet(folder, progress=False)


def test_nonfinite_converted_weights_refused(folder, tmp_path):
    """A converted folder whose weights hold a NaN (say, an export of a diverged run) is refused on load."""
    import jax

    from sfv_jax.checkpoint import convert

    out = convert.convert_folder(folder, tmp_path / "converted", progress=False)
    _, params = pretrained.load_unet(out)
    leaves, tree = jax.tree.flatten(jax.tree.map(np.array, params))
    leaves[0][...] = np.nan
    convert.save_converted(
        tmp_path / "bad", jax.tree.unflatten(tree, leaves), json.loads((out / "config.json").read_text()), "unet"
    )
    with pytest.raises(CheckpointError, match="values are not finite"):
        pretrained.load_unet(tmp_path / "bad")

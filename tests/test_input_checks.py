"""Everything a command reads is checked where it enters: damaged metadata, overlapping safetensors byte
ranges, nonsense numbers in configs and flags, oversized images. Each case is one ``error:`` line naming
the file, key or flag (or the library's exception carrying that line), never a traceback, and nothing is
written."""

from __future__ import annotations

import json
import shutil

import ml_collections
import numpy as np
import PIL.Image
import pytest

from sfv_jax.checkpoint import components, pretrained
from sfv_jax.checkpoint import convert as convert_lib
from sfv_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, save_file
from sfv_jax.cli import convert as convert_cli
from sfv_jax.cli import export as export_cli
from sfv_jax.configs import tiny
from sfv_jax.data.folder import DatasetError, build_folder_dataset
from sfv_jax.diffusion import conditioning
from sfv_jax.models import presets
from sfv_jax.training import checkpoints
from sfv_jax.training.run_config import ConfigError, check_config, check_workdir


@pytest.fixture(scope="module")
def converted_unet(tiny_unet_dirs, tmp_path_factory):
    """A converted tiny UNet folder (made once; tests copy it before damaging it)."""
    return convert_lib.convert_folder(
        tiny_unet_dirs["tiny_a"], tmp_path_factory.mktemp("conv") / "unet", progress=False
    )


def _copy(folder, tmp_path):
    dst = tmp_path / "unet"
    shutil.copytree(folder, dst)
    return dst


# ---------------------------------------------------------------------------------------- safetensors


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize(
    "offsets, pattern",
    [
        ([(0, 16), (0, 16)], "overlaps 'a'"),  # two tensors on one byte range: one would read the other's values
        ([(0, 16), (24, 40)], r"leaves bytes \[16, 24\) unused"),
        ([(0, 16), (16, 32)], "extra bytes at the end"),
    ],
)
def test_safetensors_byte_ranges_must_tile_the_data(tmp_path, offsets, pattern):
    header = {k: {"dtype": "F32", "shape": [4], "data_offsets": list(o)} for k, o in zip("ab", offsets, strict=True)}
    path = tmp_path / "w.safetensors"
    _raw_safetensors(path, header, bytes(48))
    with pytest.raises(CheckpointError, match=pattern) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value)


def test_safetensors_written_here_pass_the_layout_check(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(path, {"b": np.ones(3, np.float32), "a": np.zeros((2, 2), np.float16), "e": np.zeros(0, np.int8)})
    f = SafetensorsFile(path)
    assert set(f.shapes) == {"a", "b", "e"} and f.get("b").tolist() == [1, 1, 1]


# ---------------------------------------------------------------------------------------- converted folders


def test_converted_folder_naming_the_wrong_component(converted_unet, tmp_path, capsys):
    folder = _copy(converted_unet, tmp_path)
    meta = json.loads((folder / components.META_FILE).read_text())
    (folder / components.META_FILE).write_text(json.dumps({**meta, "component": "vae"}))
    out = tmp_path / "exported"
    assert convert_cli.main(["--to-diffusers", "--src", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "says component 'vae'" in err and "UNetSpatioTemporalConditionModel" in err
    assert not out.exists()
    with pytest.raises(CheckpointError, match="holds component 'vae', but it is read as the unet"):
        pretrained.load_unet(folder)


@pytest.mark.parametrize("damage", ["no_params", "meta_not_json", "meta_list", "unknown_component"])
def test_damaged_converted_folder(converted_unet, tmp_path, capsys, damage):
    folder = _copy(converted_unet, tmp_path)
    meta_file = folder / components.META_FILE
    if damage == "no_params":
        shutil.rmtree(folder / "params")
        pattern = "no params/"
    elif damage == "meta_not_json":
        meta_file.write_text("{ not json")
        pattern = "not valid JSON"
    elif damage == "meta_list":
        meta_file.write_text("[]")
        pattern = "not a JSON object"
    else:
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "component": "text_encoder"}))
        pattern = "component 'text_encoder' is not one of"
    out = tmp_path / "exported"
    assert convert_cli.main(["--to-diffusers", "--src", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and pattern in err and "Traceback" not in err, err
    assert not out.exists()


def test_unet_config_with_zero_frames(converted_unet, tmp_path):
    folder = _copy(converted_unet, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_frames": 0}))
    with pytest.raises(CheckpointError, match=r"config\.json: UNet config: `num_frames` must be a positive integer"):
        pretrained.load_unet(folder)
    with pytest.raises(ValueError, match="`in_channels` must be a positive integer"):
        pretrained.unet_from_config({**presets.UNETS["tiny_a"], "in_channels": -1})


def test_model_index_that_is_not_json(tiny_pipeline_dirs, tmp_path, capsys):
    src = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dirs[1], src)
    (src / components.PIPELINE_INDEX).write_text("{ broken")
    out = tmp_path / "converted"
    assert convert_cli.main(["--src", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model_index.json: not valid JSON" in err
    assert not out.exists() and not list(tmp_path.glob(".converted*"))


# ---------------------------------------------------------------------------------------- training configs


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        ("opt.generator_lr", float("nan"), "opt.generator_lr=nan: must be a finite number"),
        ("opt.discriminator_lr", float("inf"), "opt.discriminator_lr=inf: must be a finite number"),
        ("opt.generator_lr", 0.0, "opt.generator_lr=0.0: must be > 0"),
        ("opt.ema_rate", 1.5, "opt.ema_rate=1.5: must be in"),
        ("opt.ema_rate", -0.1, "opt.ema_rate=-0.1: must be in"),
        ("opt.b2", 1.0, "opt.b2=1.0: must be in"),
        ("loss.r1_gamma", float("nan"), "loss.r1_gamma=nan: must be a finite number"),
        ("opt.weight_decay", -1.0, "opt.weight_decay=-1.0: must be >= 0"),
        ("loss.sigma_max_prob", 1.5, "loss.sigma_max_prob=1.5: must be a probability"),
        ("opt.disc_updates", 0, "opt.disc_updates=0: must be a whole number >= 1"),
        ("loss.distill_weight", -1.0, "loss.distill_weight=-1.0: must be >= 0"),
        ("disc.feature_maps", "pixels", "disc.feature_maps='pixels': must be one of"),
        ("heldout_steps", 0, "heldout_steps=0: must be >= 1"),
    ],
)
def test_numbers_in_the_config_are_checked(key, value, pattern):
    config = tiny.get_config()
    *section, name = key.split(".")
    (config[section[0]] if section else config)[name] = value
    with pytest.raises(ConfigError, match=pattern.replace(".", r"\.").replace("[", r"\[")):
        check_config(config)


def test_a_workdir_whose_checkpoints_hold_a_symlink_is_refused(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (workdir / "checkpoints" / "5").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"checkpoints/5 is a symbolic link"):
        check_workdir(tiny.get_config(), workdir)
    assert (tmp_path / "elsewhere").is_dir()


@pytest.mark.parametrize("text, pattern", [("{}", "not a training config"), ("[1]", "not a JSON object")])
def test_export_of_a_workdir_with_a_damaged_config(tmp_path, capsys, text, pattern):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(text)
    out = tmp_path / "out"
    assert export_cli.main(["--workdir", str(workdir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err and pattern in err, err
    assert not out.exists()


def test_a_saved_config_passes_the_export_check(tmp_path):
    from sfv_jax.training.export import run_config

    (tmp_path / "config.json").write_text(tiny.get_config().to_json_best_effort(indent=2))
    assert isinstance(run_config(tmp_path), ml_collections.ConfigDict)


# ---------------------------------------------------------------------------------------- images and flags


def test_an_image_declaring_a_huge_size_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    PIL.Image.new("1", (9000, 9000)).save(path)  # 81 Mpx in a few kB (above MAX_PIXELS, below PIL's own limit)
    with pytest.raises(conditioning.ImageError, match=r"declares 9000x9000 pixels"):
        conditioning.load_image(path)


def test_sample_checks_the_image_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from sfv_jax.cli import sample

    path = tmp_path / "bomb.png"
    PIL.Image.new("1", (9000, 9000)).save(path)
    loaded = []
    monkeypatch.setattr(pretrained, "load_pipeline", lambda *a, **k: loaded.append(a))
    assert sample.main(["--model", str(tmp_path), "--image", str(path), "--out", str(tmp_path / "v.mp4")]) == 2
    assert "--image: image file" in capsys.readouterr().err and not loaded


@pytest.mark.parametrize(
    "flag, kw", [("--fps", {"fps": float("nan")}), ("--max-seconds", {"max_seconds": -1.0}), ("--fps", {"fps": 0})]
)
def test_build_dataset_numbers_name_the_flag(tmp_path, flag, kw):
    (tmp_path / "videos").mkdir()
    args = {"fps": 7.0, "height": 16, "width": 16, **kw}
    with pytest.raises(DatasetError, match=f"^{flag} must be a positive number"):
        build_folder_dataset(tmp_path / "videos", tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- recovered failures


def test_abandoned_reads_of_a_damaged_checkpoint_are_counted_not_printed(monkeypatch):
    """The coroutines orbax drops when it gives up on a checkpoint report their errors when collected; after
    a failed restore they are counted, while the same report from any other code still reaches the hook."""
    import gc
    import sys

    source = (
        "class _Pause:\n    def __await__(self):\n        yield\n"
        "async def read():\n    try:\n        await _Pause()\n    finally:\n        raise OSError('read failed')\n"
    )
    ours, theirs = {}, {}
    exec(compile(source, "/site-packages/orbax/checkpoint/fake_reader.py", "exec"), ours)
    exec(compile(source, "/elsewhere/user_code.py", "exec"), theirs)
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.object.cr_code.co_filename))
    monkeypatch.setattr(checkpoints.AbandonedReads, "_installed", False)
    monkeypatch.setattr(checkpoints.AbandonedReads, "count", 0)
    checkpoints.AbandonedReads.install()
    for ns in (ours, theirs):
        co = ns["read"]()
        co.send(None)  # suspended in its read: dropped like an abandoned one
        del co
        gc.collect()
    assert checkpoints.AbandonedReads.count == 1
    assert reported == ["/elsewhere/user_code.py"]

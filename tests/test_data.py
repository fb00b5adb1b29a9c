"""Real video data: the folder builder (fps resampling, resize + crop, skips), the CLI, clip
sampling and its determinism, per-process shards, UCF-101 through TFDS mock data, latent pre-encoding
(sharded CLI == on-the-fly encoding) and the loader's iterator state. Training on a built folder dataset:
tests/test_training.py (one process: the resume tests) and tests/test_sharding.py (two processes).

Every video is made here: each source frame ``i`` is a flat grey of level ``8 * i``, so the frames a
build keeps name the source frames it picked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from sfv_jax.configs import tiny
from sfv_jax.data import clips, folder, latent_store, video_io
from sfv_jax.data.latents import ClipEncoder
from sfv_jax.data.loader import Loader
from sfv_jax.data.sources import ClipSource, DataConfigError
from sfv_jax.training.layout import build_modules, frozen_encoders

REPO = Path(__file__).resolve().parents[1]
H = W = 16  # the tiny config's frame size
GREY = 8  # grey level step per source frame


def _ramp(n: int, h: int = 36, w: int = 48) -> np.ndarray:
    return np.broadcast_to((GREY * np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, h, w, 3)).copy()


def _write(path: Path, frames: np.ndarray, fps: float, codec: str) -> None:
    """Any container/codec PyAV has (the project's writer makes mp4 only)."""
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec.startswith("libvpx"):
            s.options = {"lossless": "1"}
        else:
            s.options = {"qscale": "1"} if codec == "mpeg4" else {}
        for f in frames:
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = None
            c.mux(s.encode(vf))
        c.mux(s.encode(None))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    video_io.write_video(root / "a30.mp4", _ramp(60), fps=30, crf=0)  # 2 s at 30 fps -> 14 at 7 fps
    _write(root / "sub" / "b10.avi", _ramp(20), 10, "mpeg4")  # 2 s at 10 fps -> 14
    _write(root / "sub" / "deeper" / "c25.webm", _ramp(25), 25, "libvpx-vp9")  # 1 s at 25 fps -> 7
    _write(root / "d15.mov", _ramp(45), 15, "libx264")  # 3 s at 15 fps -> 21
    video_io.write_video(root / "short.mp4", _ramp(3), fps=10, crf=0)  # 0.3 s -> 3 frames < 4
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    whole = (root / "a30.mp4").read_bytes()
    (root / "truncated.mov").write_bytes(whole[: len(whole) // 3])
    (root / "notes.txt").write_text("not a video")
    video_io.write_video(root / ".cache" / "hidden.mp4", _ramp(30), fps=10)  # hidden folders are skipped
    return root


EXPECTED = {"a30.mp4": (30, 14), "sub/b10.avi": (10, 14), "sub/deeper/c25.webm": (25, 7), "d15.mov": (15, 21)}


@pytest.fixture(scope="module")
def built(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "clips"
    info = folder.build_folder_dataset(videos, out, fps=7, height=H, width=W, min_frames=4)
    assert info["examples"] == 4 and info["skipped"] == 3, info
    return out


def _config(**data):
    config = tiny.get_config()
    config.data.workers = 2
    for k, v in data.items():
        config.data[k] = v
    return config


def test_resample_rule():
    """Output frame k is the source frame on screen at k / fps."""
    np.testing.assert_array_equal(clips.resample_indices(60, 30, 7), np.floor(np.arange(14) * 30 / 7).astype(int))
    np.testing.assert_array_equal(clips.resample_indices(4, 2, 7), [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    assert len(clips.resample_indices(7, 7, 7)) == 7
    assert clips.resize_crop(np.zeros((36, 48, 3), np.uint8), 16, 16).shape == (16, 16, 3)
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # the centre third survives a centre crop to a square
    assert clips.resize_crop(wide, 10, 10).min() > 200


def test_build_counts_sizes_fps_and_skips(built):
    source, info = folder.open_folder_dataset(built)
    assert len(source) == 4 and info["videos"] == 7  # 4 kept + short, corrupt, truncated; no txt, no hidden
    reasons = dict(map(tuple, info["skipped_videos"]))
    assert set(reasons) == {"short.mp4", "corrupt.mp4", "truncated.mov"}
    assert reasons["short.mp4"].startswith("too short: 3 frames")
    assert reasons["corrupt.mp4"].startswith("unreadable") and reasons["truncated.mov"].startswith("unreadable")
    seen = {}
    for i in range(len(source)):
        ex = source[i]
        path = ex["path"].decode()
        src_fps, count = EXPECTED[path]
        frames = np.stack([clips.decode_jpeg(j) for j in ex["frames"]])
        assert frames.shape == (count, H, W, 3) and int(ex["num_frames"]) == count, path
        assert abs(float(ex["fps"]) - src_fps) < 1e-3, path
        assert abs(float(ex["duration"]) - {30: 2, 10: 2, 25: 1, 15: 3}[src_fps]) < 0.05, path
        picked = (GREY * np.floor(np.arange(count) * src_fps / 7 + 1e-9)) % 256  # source frame at k / 7 s
        np.testing.assert_allclose(frames.reshape(count, -1).mean(1), picked, atol=4, err_msg=path)
        assert float(ex["motion_score"]) > 0
        seen[path] = count
    assert seen.keys() == EXPECTED.keys()


def test_cli_last_line_determinism_and_errors(videos, built, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "again"
    cmd = [
        sys.executable,
        "-m",
        "sfv_jax.cli.build_dataset",
        "--videos",
        str(videos),
        "--out",
        str(out),
        "--fps",
        "7",
        "--height",
        str(H),
        "--width",
        str(W),
        "--min-frames",
        "4",
        "--workers",
        "2",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "examples=4 skipped=3"
    a, _ = folder.open_folder_dataset(built)
    b, _ = folder.open_folder_dataset(out)
    by_path = {b[i]["path"]: list(b[i]["frames"]) for i in range(len(b))}
    for i in range(len(a)):  # two builds (1 and 2 workers) store the same examples, byte for byte
        assert list(a[i]["frames"]) == by_path[a[i]["path"]]
    # reading needs no TensorFlow (TFDS data source + our JPEG decoding)
    probe = (
        "import sys; from sfv_jax.data import folder, clips; src, _ = folder.open_folder_dataset(sys.argv[1]); "
        "clips.decode_jpeg(src[0]['frames'][0]); assert 'tensorflow' not in sys.modules, 'TensorFlow imported'"
    )
    run = subprocess.run([sys.executable, "-c", probe, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    # a folder without a usable video: exit 2, a clear message, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mp4").write_bytes(b"\x00" * 100)
    run = subprocess.run(
        [*cmd[:4], str(bad), "--out", str(tmp_path / "none"), *cmd[7:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and "no usable video" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none*"))
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # --out exists
    assert run.returncode == 2 and "--overwrite" in run.stderr


def test_clip_sampling_is_deterministic_and_shards_are_disjoint(built):
    config = _config(kind="folder", path=str(built))
    a, b = ClipSource(config).dataset(), ClipSource(config).dataset()
    for p in (0, 3, 11):
        assert np.array_equal(a[p]["frames"], b[p]["frames"]) and a[p]["record"] == b[p]["record"]
        assert a[p]["frames"].shape == (config.data.num_frames, H, W, 3)
    config.seed = 1
    c = ClipSource(config).dataset()
    assert any(not np.array_equal(a[p]["frames"], c[p]["frames"]) for p in range(8))
    # every epoch reads each record once
    assert sorted(a[p]["record"] for p in range(4)) == sorted(a[p]["record"] for p in range(4, 8)) == [0, 1, 2, 3]
    # two processes (rows 0 and 1 of a global micro batch of 2): disjoint samples that cover every position
    config.seed = 0
    config.data.accum_steps = 1
    procs = [Loader(config, encoder=object(), global_micro=2, rows=[r]) for r in (0, 1)]
    got = [np.concatenate([ld.positions(s * 2) for s in range(2)]) for ld in procs]
    assert not set(got[0]) & set(got[1]) and set(got[0]) | set(got[1]) == {0, 1, 2, 3}
    records = [{procs[0].examples[int(p)]["record"] for p in g} for g in got]
    assert not records[0] & records[1] and records[0] | records[1] == {0, 1, 2, 3}


def test_config_mismatch_and_missing_dataset(built, tmp_path):
    with pytest.raises(DataConfigError, match="--config.data.height/width/fps"):
        ClipSource(_config(kind="folder", path=str(built), height=32))
    with pytest.raises(DataConfigError, match="sfv_build.json"):
        ClipSource(_config(kind="folder", path=str(tmp_path)))
    with pytest.raises(DataConfigError, match="latents_info.json"):
        ClipSource(_config(kind="latents", path=str(tmp_path)))
    with pytest.raises(DataConfigError, match="tfds build ucf101"):
        ClipSource(_config(kind="ucf101", tfds_data_dir=str(tmp_path)))


def test_ucf101_through_tfds_mock_data(encoders):
    import tensorflow_datasets as tfds

    config = _config(kind="ucf101", num_frames=4)
    with tfds.testing.mock_data(num_examples=6):
        source = ClipSource(config)
        ds = source.dataset()
        assert len(source) == 6
        clip = ds[5]
        assert clip["frames"].shape == (4, H, W, 3) and clip["frames"].dtype == np.uint8
        assert np.array_equal(ClipSource(config).dataset()[5]["frames"], clip["frames"])
        video = source.records[clip["record"]]["video"]  # [T, 256, 256, 3] at 25 fps
        idx = clips.resample_indices(len(video), 25, 7)
        s = clips.window_start(len(idx), 4, np.random.default_rng([config.seed, 5]))
        want = np.stack([clips.resize_crop(video[i], H, W) for i in idx[s : s + 4]])
        np.testing.assert_array_equal(clip["frames"], want)
        # the FVD protocol's real clip: the video's first frames at 7 fps (its first frame conditions)
        first = np.stack([clips.resize_crop(video[i], H, W) for i in idx[:4]])
        np.testing.assert_array_equal(source.first_clip(clip["record"]), first)
        batch = Loader(config, encoders, source=source).batch(0)  # what the trainer gets from data.kind=ucf101
        assert batch["latents"].shape == (2, 1, 4, 8, 8, 4) and np.isfinite(batch["latents"]).all()


@pytest.fixture(scope="module")
def encoders():
    config = tiny.get_config()
    _, vae, clip = build_modules(config)
    vae_params, clip_params = frozen_encoders(config, vae, clip, __import__("jax").random.PRNGKey(config.seed))
    return ClipEncoder(vae, vae_params, clip, clip_params, seed=config.seed)


def test_loader_iterator_state_resumes_the_same_next_batch(built, encoders):
    config = _config(kind="folder", path=str(built), motion_bucket_id=-1)
    loader = Loader(config, encoders)
    it = loader.iterator(0, 4)
    first = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    third = next(it)
    resumed = Loader(config, encoders).iterator_from_state(state, 2)
    again = next(resumed)
    for k in third:
        np.testing.assert_array_equal(third[k], again[k], err_msg=k)
    assert state["position"] == 2 * loader.per_step and third["latents"].shape == (2, 1, 4, 8, 8, 4)
    np.testing.assert_array_equal(first[0]["latents"], loader.batch(0)["latents"])  # prefetched == direct
    assert not np.array_equal(first[0]["latents"], first[1]["latents"])


def test_pre_encoded_latents_equal_on_the_fly(built, encoders, tmp_path):
    """The encode CLI on 2 (virtual CPU) devices == ClipEncoder in this process, record by record."""
    out = tmp_path / "latents"
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    cmd = [
        sys.executable,
        "-m",
        "sfv_jax.cli.encode_dataset",
        "--config",
        "configs/tiny.py",
        "--out",
        str(out),
        "--config.data.kind=folder",
        f"--config.data.path={built}",
        "--config.data.motion_bucket_id=-1",
        "--batch_size=3",
    ]
    run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip().splitlines()[-1].startswith("examples=4 clips_per_s=")
    store = latent_store.LatentSource(out)
    config = _config(kind="folder", path=str(built), motion_bucket_id=-1)
    source = ClipSource(config)
    for r in range(len(store)):
        rec, ex = store[r], source.example(r, r)
        want = encoders(
            ex["frames"][None],
            np.array([r]),
            fps=7,
            noise_aug_strength=0.02,
            motion_bucket_ids=[clips.motion_bucket(ex["motion_score"])],
        )
        assert int(rec["record"]) == r
        for k in latent_store.FIELDS:
            err = np.abs(rec[k] - want[k][0]).max()
            assert err <= 1e-5, (r, k, err)
    # the trainer's latents kind reads them as stored
    lat = Loader(_config(kind="latents", path=str(out)))
    batch, pos = lat.batch(0), lat.positions(0)
    rec = store[lat.examples[int(pos[0])]["record"]]
    np.testing.assert_array_equal(batch["latents"][0, 0], rec["latents"])
    assert batch["image_embeds"].shape == (2, 1, 32)


def test_synthetic_detail_scales_the_texture_only():
    """data.synthetic_detail: 1.0 is the default dataset exactly; the toy world's 0.35 keeps every shape
    and motion (same draws) with smoother backgrounds."""
    from sfv_jax.data import video_metrics
    from sfv_jax.data.synthetic import TOY_DETAIL, synthetic_clip

    clips = np.stack([synthetic_clip(0, i, 4, 32, 32) for i in range(4)])
    np.testing.assert_array_equal(clips, np.stack([synthetic_clip(0, i, 4, 32, 32, 1.0) for i in range(4)]))
    smooth = np.stack([synthetic_clip(0, i, 4, 32, 32, TOY_DETAIL) for i in range(4)])
    assert video_metrics.sharpness(smooth) < 0.7 * video_metrics.sharpness(clips)  # measured 0.53 (edges stay)


def test_synthetic_mean_colour_shifts_each_clip_only():
    """data.synthetic_mean_colour (the toy world's 0.4): each clip's mean colour per channel becomes that
    value, by one shift per clip and channel (the same pixels up to rounding and clipping); None is the
    dataset as drawn. The trainer's source passes it through."""
    from sfv_jax.data.sources import ClipSource
    from sfv_jax.data.synthetic import TOY_DETAIL, TOY_MEAN_COLOUR, synthetic_clip

    drawn = np.stack([synthetic_clip(3, i, 6, 32, 32, TOY_DETAIL) for i in range(6)]).astype(np.float64)
    shifted = np.stack([synthetic_clip(3, i, 6, 32, 32, TOY_DETAIL, TOY_MEAN_COLOUR) for i in range(6)])
    np.testing.assert_allclose(shifted.mean(axis=(1, 2, 3)) / 255, TOY_MEAN_COLOUR, atol=2e-3)
    assert np.ptp(drawn.mean(axis=(1, 2, 3)), axis=0).min() > 10  # as drawn they differ (measured >= 13)
    inside = (shifted > 0) & (shifted < 255)
    delta = shifted.astype(np.float64) - drawn  # per clip and channel one constant, +-1 of rounding
    for i in range(6):
        for c in range(3):
            d = delta[i][..., c][inside[i][..., c]]
            assert np.ptp(d) <= 2, (i, c, np.ptp(d))
    config = _config(kind="synthetic", height=32, width=32, num_frames=6, synthetic_detail=TOY_DETAIL)
    config.data.synthetic_mean_colour = TOY_MEAN_COLOUR
    want = synthetic_clip(config.seed, 5, 6, 32, 32, TOY_DETAIL, TOY_MEAN_COLOUR)
    np.testing.assert_array_equal(ClipSource(config).example(5)["frames"], want)

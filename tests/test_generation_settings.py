"""The generation settings have one home: their defaults are diffusers' SVD pipeline's, the pipeline's
diffusers-shaped call and ``sfv-sample``'s flags are derived from (and checked against) the same fields,
and a value no generation can use is refused naming the setting."""

from __future__ import annotations

import dataclasses
import inspect

import ml_collections
import pytest

from sfv_jax.cli import sample
from sfv_jax.configs import toy_sfv
from sfv_jax.diffusion.generation import OWN_FIELDS, SAMPLERS, GenerationSettings
from sfv_jax.diffusion.pipeline import SVDPipeline

FIELDS = [f.name for f in dataclasses.fields(GenerationSettings)]


def test_defaults_are_diffusers_svd_pipeline_defaults():
    from diffusers import StableVideoDiffusionPipeline

    theirs = inspect.signature(StableVideoDiffusionPipeline.__call__).parameters
    ours = GenerationSettings()
    kwargs = ours.diffusers_kwargs()  # what the comparisons pass to diffusers' call: every name must be there
    assert sorted(kwargs) == sorted(n for n in FIELDS if n not in OWN_FIELDS)
    for name in kwargs:
        assert name in theirs, name
        want = theirs[name].default
        if name == "num_inference_steps":  # None here: the sampler's own default, 25 for the teacher as there
            assert ours.num_inference_steps is None and ours.steps == want == 25
            continue
        assert getattr(ours, name) == want, name


def test_the_pipeline_call_and_the_cli_flags_are_the_settings_fields():
    call = inspect.signature(SVDPipeline.__call__).parameters
    assert [p for p in call if p not in ("self", "image", "seed", "latents")] == FIELDS
    for name in FIELDS:
        assert call[name].default == getattr(GenerationSettings(), name), name
    args = sample.parse_args(["--model", "m", "--image", "i.png", "--out", "o.mp4", "--min-guidance-scale", "2"])
    assert all(hasattr(args, name) for name in FIELDS)
    assert args.min_guidance_scale == 2.0 and args.sampler == "sfv"  # the command's own default sampler


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"sampler": "ddim"}, "sampler 'ddim' is not one of"),
        ({"num_frames": 0}, "num_frames must be a positive integer or None"),
        ({"decode_chunk_size": 1.5}, "decode_chunk_size must be a positive integer or None"),
        ({"height": -8}, "height=-8: height and width must be positive multiples of 8"),
        ({"min_guidance_scale": float("nan")}, "min_guidance_scale must be a finite number >= 0"),
        ({"noise_aug_strength": -0.1}, "noise_aug_strength must be a finite number >= 0"),
        ({"fps": 0}, "fps must be a positive number"),
        ({"motion_bucket_id": 1.5}, "motion_bucket_id must be an integer"),
    ],
)
def test_unusable_values_are_refused_naming_the_setting(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        GenerationSettings(**change)
    with pytest.raises(ValueError, match=pattern):
        GenerationSettings().replace(**change)


def test_from_a_config_section_and_the_sampler_defaults():
    section = ml_collections.ConfigDict(
        {"height": 32.0, "width": 48, "min_guidance_scale": 1.5, "steps": 3, "decode_chunk_size": None}
    )
    g = GenerationSettings.from_mapping(section, sampler="sfv", num_frames=4)
    assert (g.height, g.width, g.min_guidance_scale, g.num_frames, g.sampler) == (32, 48, 1.5, 4, "sfv")
    assert g.decode_chunk_size is None and g.steps == 1 and not g.guided
    assert GenerationSettings(sampler="svd").guided and not GenerationSettings(max_guidance_scale=1.0).guided
    assert set(SAMPLERS) == {"svd", "sfv", "sfv_grid"}
    sample = toy_sfv.get_config().sample  # the trainer's periodic samples: unguided, or guided when asked
    assert not GenerationSettings.from_mapping(sample, sampler="sfv").guided
    sample.sfv_guidance = True
    assert GenerationSettings.from_mapping(sample, sampler="sfv").guided

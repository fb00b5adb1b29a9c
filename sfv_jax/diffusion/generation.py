"""The settings of one image-to-video generation: one home, one spelling per setting.

Every caller builds the same frozen :class:`GenerationSettings`: the pipeline (its diffusers-shaped
``__call__`` keeps diffusers' keyword names, which are these field names), ``sfv-sample`` (one flag per
field, ``--min-guidance-scale`` for ``min_guidance_scale``), the FVD evaluation (the ``eval`` section of
its config), the trainer's periodic samples (``sample`` and ``data``), the benchmarks and the toy protocol.

    settings = GenerationSettings(sampler="sfv", num_inference_steps=1)
    frames = pipe.generate([image], [seed], settings)        # [1, F, H, W, 3] in [0, 1]
    teacher = settings.replace(sampler="svd", num_inference_steps=25)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sfv_jax.diffusion import conditioning

SAMPLERS = ("svd", "sfv", "sfv_grid")  # the teacher's Euler sampler; SF-V's on its trained levels / full grid
DEFAULT_STEPS = {"svd": 25, "sfv": 1, "sfv_grid": 1}
OWN_FIELDS = ("sampler", "sfv_guidance")  # ours only: which network samples and whether SF-V is guided


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """What a generation call needs besides the image and the seed; the defaults are SVD's (1024x576, 7 fps,
    motion bucket 127, noise augmentation 0.02, guidance 1 -> 3 over the frames)."""

    height: int = 576
    width: int = 1024
    num_frames: int | None = None  # None: the UNet config's (14 for SVD, 25 for SVD-XT)
    num_inference_steps: int | None = None  # None: 25 for "svd", 1 for the SF-V samplers
    min_guidance_scale: float = 1.0  # the teacher's guidance of the first frame ("svd"; "sfv" with sfv_guidance)
    max_guidance_scale: float = 3.0  # ... and of the last (linear in between; off when both are <= 1)
    # the SF-V samplers with the same classifier-free guidance (the batch doubled: two UNet evaluations per
    # step in one forward pass). Off is the paper's SF-V; on, the one step takes the teacher's guidance too
    sfv_guidance: bool = False
    fps: float = 7  # the fps conditioning (SVD's added time id fps - 1)
    motion_bucket_id: int = 127  # the motion conditioning
    noise_aug_strength: float = 0.02  # noise added to the conditioning image (and its conditioning value)
    decode_chunk_size: int | None = None  # frames per VAE decode call; None: all at once
    sampler: str = "svd"  # one of SAMPLERS

    HELP = {
        "height": "video height in pixels",
        "width": "video width in pixels",
        "num_frames": "frames (none given: the UNet config's)",
        "num_inference_steps": "sampling steps (none given: 25 for svd, 1 for sfv)",
        "min_guidance_scale": "svd (and sfv with --sfv-guidance): guidance of the first frame",
        "max_guidance_scale": "svd (and sfv with --sfv-guidance): guidance of the last frame",
        "sfv_guidance": "sfv: apply the same guidance (the batch doubled; the paper's SF-V has none)",
        "fps": "fps conditioning (and the output's frame rate)",
        "motion_bucket_id": "motion conditioning",
        "noise_aug_strength": "noise augmentation of the conditioning image",
        "decode_chunk_size": "frames per VAE decode call (none given: all)",
        "sampler": "sfv: the SF-V generator; svd: the SVD teacher; sfv_grid: SF-V on its full grid",
    }

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """ValueError naming the setting for a value no generation can use."""

        def positive_int(name, value, optional=False):
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")

        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {SAMPLERS}")
        conditioning.check_size(self.height, self.width)  # ImageError: positive multiples of 8 (the VAE's stride)
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not 0 < self.fps < math.inf:
            raise ValueError(f"fps must be a positive number, got {self.fps!r}")
        for name in ("num_frames", "num_inference_steps", "decode_chunk_size"):
            positive_int(name, getattr(self, name), optional=True)
        if isinstance(self.motion_bucket_id, bool) or not isinstance(self.motion_bucket_id, int):
            raise ValueError(f"motion_bucket_id must be an integer, got {self.motion_bucket_id!r}")
        if not isinstance(self.sfv_guidance, bool):
            raise ValueError(f"sfv_guidance must be True or False, got {self.sfv_guidance!r}")
        for name in ("min_guidance_scale", "max_guidance_scale", "noise_aug_strength"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def steps(self) -> int:
        """``num_inference_steps``, or the sampler's default."""
        return self.num_inference_steps or DEFAULT_STEPS[self.sampler]

    @property
    def guided(self) -> bool:
        """Whether the sampler runs classifier-free guidance (the batch doubled): a scale > 1 with ``svd``, or
        with an SF-V sampler and ``sfv_guidance``."""
        scale = max(self.min_guidance_scale, self.max_guidance_scale)
        return (self.sampler == "svd" or self.sfv_guidance) and scale > 1

    def replace(self, **changes: Any) -> GenerationSettings:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def diffusers_kwargs(self) -> dict[str, Any]:
        """The fields diffusers' ``StableVideoDiffusionPipeline.__call__`` takes, under the same names (all but
        ``OWN_FIELDS``): the teacher's call there, for the comparisons against the reference."""
        return {k: v for k, v in self.as_dict().items() if k not in OWN_FIELDS}

    @classmethod
    def from_mapping(cls, values: Any, **overrides: Any) -> GenerationSettings:
        """The fields ``values`` (a dict or a config section) holds under their own names, then ``overrides``
        (ints where the field is an int: configs store numbers as they were typed)."""
        names = {f.name for f in dataclasses.fields(cls)}
        found = {k: values[k] for k in names if k in values and values[k] is not None}
        found.update(overrides)
        for k in ("height", "width", "fps", "motion_bucket_id", "num_frames", "num_inference_steps"):
            if isinstance(found.get(k), float) and float(found[k]).is_integer():
                found[k] = int(found[k])
        return cls(**found)

"""The augmentation recipe as data, without TensorFlow: the reference's constants,
`AugmentSpec` (what to do to one view) and the layout of the colour-stage parameters that the
host ships beside each uint8 view for `device_augment`.

`augment` (the host's tf.data share: crop, resize, flip, the draws) and `device_augment` (the
colour stage in the jitted step) both read these, so the train step imports without
TensorFlow; `augment` re-exports every name here.
"""
from __future__ import annotations

import dataclasses

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)           # ITU-R 601-2, as PIL's convert("L") and torchvision
RECIPES = ("strong", "weak")
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10                     # torchvision's RandomResizedCrop tries 10 boxes
JITTER = (0.4, 0.4, 0.4, 0.1)          # brightness, contrast, saturation, hue
JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA = (0.1, 2.0)
FLIP_PROB = 0.5


# The data config's key for each AugmentSpec field, for `from_config`'s errors.
CONFIG_KEYS = {"size": "image_size", "recipe": "aug", "downsample_prob": "downsample_prob",
               "down_res": "down_res", "dtype": "image_dtype", "min_crop_scale": "min_crop_scale"}


class SpecError(ValueError):
    """A bad AugmentSpec value; `field` names it, so that a caller reading a config can name
    its own key instead (see `AugmentSpec.from_config`)."""

    def __init__(self, field: str, value, reason: str):
        super().__init__(f"AugmentSpec.{field}={value!r}: {reason}")
        self.field, self.value, self.reason = field, value, reason


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """What to do to one view; `from_config` builds it from a data config section."""
    size: int
    recipe: str = "strong"
    downsample_prob: float = 0.0
    down_res: tuple[int, ...] = (64, 128)
    dtype: str = "float32"
    min_crop_scale: float = 0.0     # > 0 overrides the recipe's smallest crop area fraction

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise SpecError("recipe", self.recipe, f"choose one of {RECIPES}")
        if self.size <= 0:
            raise SpecError("size", self.size, "must be positive")
        if not 0.0 <= self.downsample_prob <= 1.0:
            raise SpecError("downsample_prob", self.downsample_prob, "not in [0, 1]")
        if self.downsample_prob > 0 and (not self.down_res or min(self.down_res) <= 0):
            raise SpecError("down_res", self.down_res, "need positive resolutions")
        if not 0.0 <= self.min_crop_scale <= 1.0:
            raise SpecError("min_crop_scale", self.min_crop_scale, "not in [0, 1]")
        if self.dtype not in ("float32", "bfloat16"):
            raise SpecError("dtype", self.dtype, "use 'float32' or 'bfloat16'")

    @property
    def crop_scale(self) -> tuple[float, float]:
        if self.min_crop_scale > 0:
            return (self.min_crop_scale, 1.0)
        return (0.08, 1.0) if self.recipe == "strong" else (0.5, 1.0)

    @classmethod
    def from_config(cls, data_config, section: str = "data") -> "AugmentSpec":
        """The spec a data config section asks for; a bad value raises naming `section.key`."""
        c = data_config
        try:
            return cls(size=int(c.image_size), recipe=str(c.aug),
                       downsample_prob=float(c.downsample_prob) if c.downsample else 0.0,
                       down_res=tuple(int(r) for r in c.down_res), dtype=str(c.image_dtype),
                       min_crop_scale=float(c.get("min_crop_scale", 0.0)))
        except SpecError as e:
            raise ValueError(f"{section}.{CONFIG_KEYS[e.field]}={e.value!r}: {e.reason}") from e


# The colour stage's parameters of one view, packed in a float32 vector [NUM_PARAMS] that the
# pipeline ships beside the uint8 view (batch key PARAMS_KEY) for `device_augment`:
P_JITTER = 0                 # 1.0: ColorJitter applied (p=0.8)
P_ORDER = slice(1, 5)        # its order: indices into (brightness, contrast, saturation, hue)
P_FACTORS = slice(5, 9)      # brightness, contrast, saturation, hue factors
P_GRAY = 9                   # 1.0: grayscale (p=0.2)
P_BLUR = 10                  # 1.0: Gaussian blur (p=0.5)
P_SIGMA = 11                 # the blur's sigma
NUM_PARAMS = 12
PARAMS_KEY = "view_params"


"""RandAugment for video clips, as BackBone_tvr applies it to training frames.

BackBone_tvr (``tvr/dataloaders/dataloader_retrieval.py`` l.88-92, l.280-282) builds
``create_random_augment(input_size=(224, 224), auto_augment="rand-m7-n4-mstd0.5-inc1", interpolation="bicubic")``
(``video_transforms.py`` l.621-654) and applies it to the list of decoded PIL frames *before* the CLIP
resize/crop. The ops and their level -> argument maps are those of ``tvr/dataloaders/rand_augment.py``
(l.64-334, a copy of timm's ``auto_augment.py``); the clip logic is its ``AugmentOp``/``RandAugment``
(l.337-478):

* ``num_layers`` (4) ops are drawn **with replacement** from the 15 "increasing" ops (l.404-420, l.468-478);
* each drawn op fires with probability 0.5 (l.365);
* its magnitude is drawn once from ``N(magnitude, magnitude_std)`` = N(7, 0.5) and clipped to ``[0, 10]``
  (l.367-370), its sign (for the signed ops) once with probability 1/2 (l.195-197);
* the **same** op, magnitude and sign are applied to every frame of the clip (l.377-380);
* geometric ops fill with (128, 128, 128) and resample bicubic (``_FILL`` l.36; ``create_random_augment`` passes
  ``interpolation=BICUBIC`` and no ``img_mean``, so ``AugmentOp.kwargs`` l.349-356 hold exactly these two);
* ``TranslateXRel/YRel`` move by ``pct * width`` / ``pct * height`` of the frame they get, i.e. the original
  decoded frame (augmentation runs before the resize).

The official code draws from Python's global ``random`` and NumPy's global state (shared across DataLoader
workers under old torch). Here the randomness is explicit: :meth:`RandAugment.sample` takes a
``numpy.random.Generator`` and returns the draws; :meth:`RandAugment.apply` applies given draws. The draws have
the official distributions and are made in the official order (op choice, then per op: fire?, magnitude, sign);
the streams themselves cannot match the official process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jaxprvr.errors import JaxprvrError

OFFICIAL_CONFIG = "rand-m7-n4-mstd0.5-inc1"
MAX_LEVEL = 10.0
FILL = (128, 128, 128)
TRANSLATE_PCT = 0.45  # hparams.get("translate_pct", 0.45): create_random_augment never sets it

# Op lists, in the official order (the order matters for which op an index of the choice picks).
INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
DEFAULT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# Ops whose level -> argument map calls ``_randomly_negate`` (and so consumes a sign draw).
SIGNED_OPS = frozenset({
    "Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
})
ALL_OPS = frozenset(INCREASING_OPS) | frozenset(DEFAULT_OPS)


def _pil():
    try:
        from PIL import Image, ImageEnhance, ImageOps
    except ImportError as e:  # pragma: no cover - Pillow is a dependency of the video path
        raise JaxprvrError("jaxprvr.data.rand_augment", "Pillow installed (pip install Pillow)", "no module PIL") from e
    return Image, ImageEnhance, ImageOps


def op_args(name: str, magnitude: float, negate: bool = False) -> tuple:
    """The arguments the official ``LEVEL_TO_ARG[name]`` gives for ``magnitude`` (already clipped to [0, 10]).

    ``negate`` is the outcome of the sign draw; ignored by the unsigned ops. The arithmetic is written in the
    official order of operations so the float arguments are bit-identical.
    """
    m = magnitude
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":  # [-30, 30] degrees
        v = (m / MAX_LEVEL) * 30.0
        return (-v if negate else v,)
    if name == "Posterize":  # keep 0..4 bits, decreasing severity
        return (int((m / MAX_LEVEL) * 4),)
    if name == "PosterizeIncreasing":  # keep 4..0 bits
        return (4 - int((m / MAX_LEVEL) * 4),)
    if name == "Solarize":  # threshold 0..256
        return (int((m / MAX_LEVEL) * 256),)
    if name == "SolarizeIncreasing":  # threshold 256..0
        return (256 - int((m / MAX_LEVEL) * 256),)
    if name == "SolarizeAdd":  # add 0..110 below 128
        return (int((m / MAX_LEVEL) * 110),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):  # factor 0.1..1.9
        return ((m / MAX_LEVEL) * 1.8 + 0.1,)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        v = (m / MAX_LEVEL) * 0.9  # factor 1 -/+ 0.9
        return (1.0 + (-v if negate else v),)
    if name in ("ShearX", "ShearY"):  # [-0.3, 0.3]
        v = (m / MAX_LEVEL) * 0.3
        return (-v if negate else v,)
    if name in ("TranslateXRel", "TranslateYRel"):  # fraction of the frame size, [-0.45, 0.45]
        v = (m / MAX_LEVEL) * TRANSLATE_PCT
        return (-v if negate else v,)
    raise JaxprvrError("RandAugment op", f"one of {sorted(ALL_OPS)}", repr(name))


def apply_op(img, name: str, magnitude: float, negate: bool = False, *, fill=FILL, resample=None):
    """Apply one official op to one RGB ``PIL.Image`` with the arguments :func:`op_args` gives."""
    Image, ImageEnhance, ImageOps = _pil()
    if resample is None:
        resample = Image.Resampling.BICUBIC
    args = op_args(name, magnitude, negate)
    geo = dict(resample=resample, fillcolor=fill)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(args[0], **geo)
    if name in ("Posterize", "PosterizeIncreasing"):
        bits = args[0]
        if bits >= 8:
            return img
        if bits <= 0:
            # Keeping 0 bits (PosterizeIncreasing at magnitude 10, Posterize below 2.5): Pillow of the official era
            # (8.4 checked) masks with ~(2**8 - 1), i.e. all black; Pillow 13 refuses bits < 1.
            return img.point([0] * (256 * len(img.getbands())))
        return ImageOps.posterize(img, bits)
    if name in ("Solarize", "SolarizeIncreasing"):
        return ImageOps.solarize(img, args[0])
    if name == "SolarizeAdd":
        add, thresh = args[0], 128
        if img.mode not in ("L", "RGB"):
            return img  # the official op leaves other modes alone
        table = [min(255, v + add) if v < thresh else v for v in range(256)]
        return img.point(table * (3 if img.mode == "RGB" else 1))
    if name in ("Color", "ColorIncreasing"):
        return ImageEnhance.Color(img).enhance(args[0])
    if name in ("Contrast", "ContrastIncreasing"):
        return ImageEnhance.Contrast(img).enhance(args[0])
    if name in ("Brightness", "BrightnessIncreasing"):
        return ImageEnhance.Brightness(img).enhance(args[0])
    if name in ("Sharpness", "SharpnessIncreasing"):
        return ImageEnhance.Sharpness(img).enhance(args[0])
    affine = Image.Transform.AFFINE
    if name == "ShearX":
        return img.transform(img.size, affine, (1, args[0], 0, 0, 1, 0), **geo)
    if name == "ShearY":
        return img.transform(img.size, affine, (1, 0, 0, args[0], 1, 0), **geo)
    if name == "TranslateXRel":
        return img.transform(img.size, affine, (1, 0, args[0] * img.size[0], 0, 1, 0), **geo)
    if name == "TranslateYRel":
        return img.transform(img.size, affine, (1, 0, 0, 0, 1, args[0] * img.size[1]), **geo)
    raise AssertionError(name)  # op_args rejected unknown names already


@dataclass(frozen=True)
class OpDraw:
    """One drawn op of one clip: whether it fires and, if so, its clipped magnitude and sign."""

    name: str
    applied: bool
    magnitude: float | None = None
    negate: bool = False


class RandAugment:
    """Clip-consistent RandAugment (``rand-m{magnitude}-n{num_layers}-mstd{magnitude_std}[-inc1]``).

    ``aug(frames, rng)`` draws once per clip and applies the same ops to every frame. ``frames`` is a uint8
    array ``[T, H, W, 3]`` (returned as such) or a list of RGB PIL images (returned as a list).
    """

    def __init__(self, magnitude: float = 7, num_layers: int = 4, magnitude_std: float = 0.5,
                 increasing: bool = True, prob: float = 0.5, fill=FILL, resample=None):
        self.magnitude = magnitude
        self.num_layers = int(num_layers)
        self.magnitude_std = float(magnitude_std)
        self.ops = INCREASING_OPS if increasing else DEFAULT_OPS
        self.prob = float(prob)
        self.fill = tuple(fill)
        self.resample = resample

    @classmethod
    def from_config(cls, config: str = OFFICIAL_CONFIG, **kwargs) -> "RandAugment":
        """Parse timm's config string the way the official ``rand_augment_transform`` (l.481-531) does.

        Keys: ``m`` (int magnitude, default 10), ``n`` (layers, default 2), ``mstd`` (float), ``inc``. As in the
        official parser, ``inc<anything>`` selects the increasing ops (it tests ``bool(<the string>)``, so even
        ``inc0`` does). The weighted choice ``w`` is not supported; unknown keys are an error (the official
        parser ignores them).
        """
        parts = config.split("-")
        if parts[0] != "rand":
            raise JaxprvrError("RandAugment config", "a string starting with 'rand-'", repr(config))
        magnitude, num_layers, mstd, increasing = MAX_LEVEL, 2, 0.0, False
        for part in parts[1:]:
            pieces = re.split(r"(\d.*)", part)
            if len(pieces) < 2:
                continue
            key, val = pieces[:2]
            if key == "mstd":
                mstd = float(val)
            elif key == "inc":
                increasing = increasing or bool(val)
            elif key == "m":
                magnitude = int(val)
            elif key == "n":
                num_layers = int(val)
            else:
                raise JaxprvrError("RandAugment config", "keys m, n, mstd, inc", f"{key!r} in {config!r}")
        return cls(magnitude=magnitude, num_layers=num_layers, magnitude_std=mstd, increasing=increasing, **kwargs)

    def sample(self, rng: np.random.Generator) -> tuple[OpDraw, ...]:
        """The draws for one clip, in the official order: the ops, then per op fire?/magnitude/sign."""
        if not isinstance(rng, np.random.Generator):
            raise JaxprvrError("RandAugment.sample", "a numpy.random.Generator", type(rng).__name__)
        chosen = rng.choice(len(self.ops), size=self.num_layers, replace=True)
        draws = []
        for k in chosen:
            name = self.ops[int(k)]
            if self.prob < 1.0 and rng.random() > self.prob:
                draws.append(OpDraw(name, False))
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = float(rng.normal(m, self.magnitude_std))
            m = min(MAX_LEVEL, max(0, m))
            negate = bool(rng.random() > 0.5) if name in SIGNED_OPS else False
            draws.append(OpDraw(name, True, m, negate))
        return tuple(draws)

    def apply(self, frames, draws: Sequence[OpDraw]):
        """Apply ``draws`` (from :meth:`sample`) to every frame of a clip."""
        Image, _, _ = _pil()
        as_array = isinstance(frames, np.ndarray)
        if as_array:
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                raise JaxprvrError("RandAugment frames", "uint8 [T, H, W, 3]", f"{frames.dtype} {frames.shape}")
            images = [Image.fromarray(f) for f in frames]
        else:
            images = list(frames)
        for d in draws:
            if d.applied:
                images = [apply_op(img, d.name, d.magnitude, d.negate, fill=self.fill, resample=self.resample)
                          for img in images]
        if as_array:
            return np.stack([np.asarray(img, dtype=np.uint8) for img in images]) if images else frames.copy()
        return images

    def __call__(self, frames, rng: np.random.Generator):
        return self.apply(frames, self.sample(rng))

    def __repr__(self):
        inc = "-inc1" if self.ops is INCREASING_OPS else ""
        return f"RandAugment(rand-m{self.magnitude}-n{self.num_layers}-mstd{self.magnitude_std}{inc})"

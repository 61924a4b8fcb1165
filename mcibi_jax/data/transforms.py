"""Data augmentation and preprocessing on numpy samples, with the reference pipelines' semantics.

A *sample* is a dict ``{"image": uint8 (H, W, 3) RGB, "label": int32 (H, W)}`` (the label may be
absent for inference); other keys are passed through. Every function returns a new dict and
leaves its input untouched. Randomness comes only from the ``np.random.Generator`` passed in;
each random transform draws in the same order, the same number of times and from the same
distributions as the reference (with ``random()`` for its ``rand``/``random_sample``,
``integers`` for ``randint`` and ``uniform`` for ``uniform``). Resizing narrows the label to
int16 where its values fit (less to copy through crop and flip); the pipelines return int32.

Training (``train_transform``): random-scale resize -> random crop (re-drawn while one class
dominates) -> horizontal flip (with left/right label swaps) -> [rotation] -> photometric
distortion -> normalise -> pad to the crop size (image with 0 after normalisation, label with
the ignore label). Evaluation (``eval_transform``): resize without random scale -> normalise;
the label keeps its original resolution, since predictions are resized back to it.

Interpolation is OpenCV's (``cv2``), as in the reference: images bilinear (rotation bicubic),
labels nearest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

Sample = dict[str, Any]
Transform = Callable[..., Sample]

IGNORE_LABEL = -100
CROP_TRIES = 10  # the reference re-draws a crop at most this many times


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, (int, np.integer)):
        return int(x), int(x)
    a, b = x
    return int(a), int(b)


def _cv_label(label: np.ndarray) -> np.ndarray:
    # the reference keeps labels as float32 for OpenCV; class ids and -100 are exact in it
    return np.ascontiguousarray(label, dtype=np.float32)


def _nearest_label(label: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map; int16 out when its values fit, else int32.

    Nearest resizing only copies values, so int16 picks the same pixels as the reference's
    float32, with half the bytes to write (the label may grow to 4x its pixels here).
    """
    label = np.asarray(label)
    narrow = label.dtype == np.int16 or (
        label.size and _fits(int(label.min()), np.int16) and _fits(int(label.max()), np.int16)
    )
    if narrow:
        label = np.ascontiguousarray(label, dtype=np.int16)
        return cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    out = cv2.resize(_cv_label(label), (width, height), interpolation=cv2.INTER_NEAREST)
    return out.astype(np.int32)


def _fits(value: int, dtype: np.dtype) -> bool:
    info = np.iinfo(dtype)
    return info.min <= value <= info.max


def _replace(sample: Mapping[str, Any], **arrays: np.ndarray) -> Sample:
    out = dict(sample)
    out.update(arrays)
    return out


# --------------------------------------------------------------------------------------------
# Resize


def resized_shape(
    shape: tuple[int, int], output_size: Sequence[int] | None, keep_ratio: bool
) -> tuple[int, int]:
    """(h, w) an image of ``shape`` (h, w) is resized to for ``output_size`` (a size pair).

    With ``keep_ratio`` the aspect ratio is kept and the image fits its long side in
    ``max(output_size)`` and its short side in ``min(output_size)`` (rounded half up). Without
    it the image becomes ``output_size`` oriented like the image (landscape when h <= w).
    ``output_size=None``: the image keeps its size.
    """
    h, w = shape
    if output_size is None:
        return int(h), int(w)
    big, small = max(output_size), min(output_size)
    if keep_ratio:
        factor = min(big / max(h, w), small / min(h, w))
        return int(h * factor + 0.5), int(w * factor + 0.5)
    return (big, small) if h > w else (small, big)


def resize(sample: Mapping[str, Any], shape: tuple[int, int]) -> Sample:
    """Resize to ``shape`` (h, w): image bilinear (OpenCV, uint8 fixed point), label nearest.

    The label comes back as int16 when its values fit (int32 otherwise)."""
    h, w = shape
    out = _replace(
        sample, image=cv2.resize(sample["image"], (w, h), interpolation=cv2.INTER_LINEAR)
    )
    if "label" in sample:
        out["label"] = _nearest_label(sample["label"], w, h)
    return out


def random_resize(
    sample: Mapping[str, Any],
    output_size: Sequence[int],
    keep_ratio: bool,
    scale_range: Sequence[float] | None,
    rng: np.random.Generator,
) -> Sample:
    """Resize for ``output_size`` scaled by a factor drawn uniformly from ``scale_range``.

    Each side of ``output_size`` is multiplied by the factor and truncated to an int before
    :func:`resized_shape`. ``scale_range=None`` draws nothing and uses ``output_size`` as is.
    """
    size = tuple(output_size)
    if scale_range is not None:
        lo, hi = scale_range
        scale = rng.random() * (hi - lo) + lo
        size = int(size[0] * scale), int(size[1] * scale)
    return resize(sample, resized_shape(sample["image"].shape[:2], size, keep_ratio))


# --------------------------------------------------------------------------------------------
# Crop


def crop(sample: Mapping[str, Any], top: int, left: int, height: int, width: int) -> Sample:
    """Crop rows ``top:top+height`` and columns ``left:left+width`` of image and label."""
    window = np.s_[top : top + height, left : left + width]
    out = _replace(sample, image=sample["image"][window])
    if "label" in sample:
        out["label"] = sample["label"][window]
    return out


def random_crop(
    sample: Mapping[str, Any],
    crop_size: int | Sequence[int],
    rng: np.random.Generator,
    one_category_max_ratio: float = 0.75,
    ignore_label: int = IGNORE_LABEL,
    max_tries: int = CROP_TRIES,
) -> Sample:
    """Random crop of at most ``crop_size`` (h, w), re-drawn while one class dominates it.

    A crop is accepted when its non-ignored pixels hold at least two classes and the largest
    covers less than ``one_category_max_ratio`` of them; after ``max_tries`` draws the last one
    is kept. Each draw takes ``top`` then ``left`` from ``rng.integers``. If that last crop is
    all ``ignore_label``, the sample comes back uncropped (:func:`pad` then cuts it to size).
    """
    h, w = sample["image"].shape[:2]
    ch, cw = _pair(crop_size)
    ch, cw = min(ch, h), min(cw, w)
    for _ in range(max_tries):
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = crop(sample, top, left, ch, cw)
        classes, counts = np.unique(out["label"], return_counts=True)
        counts = counts[classes != ignore_label]
        if len(counts) > 1 and counts.max() / counts.sum() < one_category_max_ratio:
            break
    if len(counts) == 0:
        # reference quirk: when the last crop is all ignore, the sample is returned uncropped
        return dict(sample)
    return out


# --------------------------------------------------------------------------------------------
# Flip and rotation


def hflip(sample: Mapping[str, Any], label_pairs: Sequence[Sequence[int]] = ()) -> Sample:
    """Mirror left-right; then swap the classes of each ``(a, b)`` in ``label_pairs``."""
    out = _replace(sample, image=sample["image"][:, ::-1].copy())
    if "label" in sample:
        label = sample["label"][:, ::-1].copy()
        for a, b in label_pairs:  # one pair after the other, as the reference does
            is_a, is_b = label == a, label == b
            label[is_a], label[is_b] = b, a
        out["label"] = label
    return out


def random_flip(
    sample: Mapping[str, Any],
    rng: np.random.Generator,
    prob: float = 0.5,
    label_pairs: Sequence[Sequence[int]] = (),
) -> Sample:
    """:func:`hflip` when ``rng.random() <= prob``."""
    if rng.random() > prob:
        return dict(sample)
    return hflip(sample, label_pairs)


def rotate(sample: Mapping[str, Any], angle: float, ignore_label: int = IGNORE_LABEL) -> Sample:
    """Rotate by ``angle`` degrees (counter-clockwise) about (w/2, h/2), keeping the size.

    Image bicubic with 0 outside, label nearest with ``ignore_label`` outside (OpenCV).
    """
    h, w = sample["image"].shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
    image = cv2.warpAffine(
        np.ascontiguousarray(sample["image"]),
        matrix,
        (w, h),
        flags=cv2.INTER_CUBIC,
        borderValue=0.0,
    )
    out = _replace(sample, image=image)
    if "label" in sample:
        label = cv2.warpAffine(
            _cv_label(sample["label"]),
            matrix,
            (w, h),
            flags=cv2.INTER_NEAREST,
            borderValue=float(ignore_label),
        )
        out["label"] = label.astype(np.int32)
    return out


def random_rotation(
    sample: Mapping[str, Any],
    rng: np.random.Generator,
    prob: float = 0.5,
    max_angle: int = 30,
    ignore_label: int = IGNORE_LABEL,
) -> Sample:
    """:func:`rotate` when ``rng.random() <= prob``, by an integer angle in [-max_angle, max_angle).

    The upper end is excluded, as in the reference (``integers(-max_angle, max_angle)``).
    """
    if rng.random() > prob:
        return dict(sample)
    angle = int(rng.integers(-int(max_angle), int(max_angle)))
    return rotate(sample, angle, ignore_label)


# --------------------------------------------------------------------------------------------
# Photometric distortion (uint8 in, uint8 out)


def _affine_uint8(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``x * alpha + beta`` in float32, clipped to [0, 255] and truncated to uint8."""
    y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(y, 0, 255).astype(np.uint8)


_UINT8_VALUES = np.arange(256, dtype=np.uint8)


def _apply_per_channel(image: np.ndarray, tables: Sequence[np.ndarray | None]) -> np.ndarray:
    """(H, W, C) uint8 -> each channel through its 256-entry table (None: unchanged).

    A table holds a per-value function's results, so the image gets exactly the values the
    function computes, at the cost of one lookup per pixel.
    """
    lut = np.stack([_UINT8_VALUES if t is None else t for t in tables], axis=-1)
    return cv2.LUT(image, lut.reshape(1, 256, len(tables)))


def _affine_image(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """:func:`_affine_uint8` of a uint8 array, by table lookup (the same values)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        return _affine_uint8(image, alpha, beta)
    return cv2.LUT(image, _affine_uint8(_UINT8_VALUES, alpha, beta)).reshape(image.shape)


def _to_hsv(image: np.ndarray) -> np.ndarray:
    # reference quirk: it converts its BGR image with RGB2HSV, i.e. red and blue are swapped in
    # the hue; on our RGB image the same values come from BGR2HSV (and HSV2BGR back)
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2HSV)


def _from_hsv(hsv: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def adjust_brightness(image: np.ndarray, delta: float) -> np.ndarray:
    """uint8 image + ``delta`` (float32), clipped and truncated."""
    return _affine_image(image, beta=delta)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 image * ``factor`` (float32), clipped and truncated."""
    return _affine_image(image, alpha=factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Scale OpenCV's 8-bit HSV saturation by ``factor``."""
    saturation = _affine_uint8(_UINT8_VALUES, alpha=factor)
    return _from_hsv(_apply_per_channel(_to_hsv(image), [None, saturation, None]))


def adjust_hue(image: np.ndarray, delta: int) -> np.ndarray:
    """Shift OpenCV's 8-bit hue (0..179, 2 degrees a step) by ``delta`` steps, modulo 180."""
    hue = ((_UINT8_VALUES.astype(np.int64) + int(delta)) % 180).astype(np.uint8)
    return _from_hsv(_apply_per_channel(_to_hsv(image), [hue, None, None]))


def photometric_distortion(
    sample: Mapping[str, Any],
    rng: np.random.Generator,
    brightness_delta: float = 32,
    contrast_range: Sequence[float] = (0.5, 1.5),
    saturation_range: Sequence[float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> Sample:
    """Random brightness, contrast, saturation and hue changes of the uint8 image.

    Order and draws: brightness (``integers(2)`` to apply, then ``uniform(-d, d)``); a mode
    ``integers(2)``; contrast here if mode == 1; saturation; hue (``integers(-d, d)`` steps);
    contrast here if mode == 0. Each step is applied with probability 1/2 and its amount drawn
    only then; contrast draws ``uniform(*contrast_range)``, saturation ``uniform(*saturation_range)``.
    """
    image = sample["image"]

    def contrast(img: np.ndarray) -> np.ndarray:
        if not rng.integers(2):
            return img
        return adjust_contrast(img, rng.uniform(*contrast_range))

    if rng.integers(2):
        image = adjust_brightness(image, rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1:
        image = contrast(image)
    if rng.integers(2):
        image = adjust_saturation(image, rng.uniform(*saturation_range))
    if rng.integers(2):
        image = adjust_hue(image, rng.integers(-hue_delta, hue_delta))
    if mode == 0:
        image = contrast(image)
    return _replace(sample, image=image)


# --------------------------------------------------------------------------------------------
# Normalise and pad


def normalize_image(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(H, W, 3) -> float32 ``(image - mean) / std``, rounded as the reference's OpenCV calls.

    The subtraction is float32 (with a float32 mean) and the multiplication by ``1 / std``
    float64, rounded to float32: bit-identical to ``cv2.subtract`` / ``cv2.multiply``. A uint8
    image with up to 4 channels is mapped through a table of those values (3x faster).
    """
    channels = len(mean)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == channels <= 4:
        table = _normalize_table(tuple(map(float, mean)), tuple(map(float, std)))
        return cv2.LUT(image, table.reshape(1, 256, channels))
    return _normalize_values(image, mean, std)


def _normalize_values(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    x = x.astype(np.float32) - np.asarray(mean, np.float32)
    return (x * (1.0 / np.asarray(std, np.float64))).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(256, C) float32: :func:`normalize_image` of every uint8 value in every channel."""
    values = np.repeat(_UINT8_VALUES[:, None], len(mean), axis=1)
    table = _normalize_values(values, mean, std)
    table.setflags(write=False)
    return table


def normalize(sample: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]) -> Sample:
    """:func:`normalize_image` on the sample's image (RGB mean and std)."""
    return _replace(sample, image=normalize_image(sample["image"], mean, std))


def _pad_or_crop(
    x: np.ndarray, top: int, bottom: int, left: int, right: int, value: float
) -> np.ndarray:
    # negative amounts remove rows/columns, as torch.nn.functional.pad does in the reference
    if top == bottom == left == right == 0:
        return x  # already the size: nothing to copy
    h, w = x.shape[:2]
    x = x[max(-top, 0) : h - max(-bottom, 0), max(-left, 0) : w - max(-right, 0)]
    widths = [(max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0))] + [(0, 0)] * (
        x.ndim - 2
    )
    return np.pad(x, widths, constant_values=value)


def pad(
    sample: Mapping[str, Any],
    size: int | Sequence[int],
    ignore_label: int = IGNORE_LABEL,
    image_value: float = 0.0,
) -> Sample:
    """Pad image and label to ``size`` (h, w), centred: top/left get the smaller half.

    If the image is portrait and ``size`` landscape (or the reverse), ``size`` is transposed
    first. The image is filled with ``image_value`` (0, after normalisation), the label with
    ``ignore_label``. A side larger than the target is cut, centred the same way.
    """
    h, w = sample["image"].shape[:2]
    th, tw = _pair(size)
    if (h > w and th < tw) or (h < w and th > tw):
        th, tw = tw, th
    top, left = (th - h) // 2, (tw - w) // 2
    bottom, right = th - h - top, tw - w - left
    out = _replace(
        sample, image=_pad_or_crop(sample["image"], top, bottom, left, right, image_value)
    )
    if "label" in sample:
        label = np.asarray(sample["label"])
        if label.dtype.kind in "iu" and not _fits(ignore_label, label.dtype):
            label = label.astype(np.int32)
        out["label"] = _pad_or_crop(label, top, bottom, left, right, ignore_label)
    return out


# --------------------------------------------------------------------------------------------
# Pipelines from ``config.dataset``


def _photometric_options(option: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    if option is True:
        return {}
    if not option:
        return None
    return dict(option)


def train_transform(dataset_config: Mapping[str, Any], rng: np.random.Generator) -> Transform:
    """Training pipeline of ``config.dataset`` (uses ``train``, ``mean``, ``std``, ``ignore_label``).

    Returns ``fn(sample, rng=None) -> sample``: uint8 RGB image and int32 label in, float32
    normalised (pad_h, pad_w, 3) image and int32 (pad_h, pad_w) label out. ``fn`` draws from
    the builder's ``rng`` unless given another one. As in the reference, a non-square
    ``pad_size`` is transposed when the crop comes out in the other orientation (an image
    smaller than the crop), so such outputs can be (pad_w, pad_h).
    """
    cfg = dataset_config["train"]
    mean, std = tuple(dataset_config["mean"]), tuple(dataset_config["std"])
    ignore = int(dataset_config["ignore_label"])
    output_size = tuple(cfg["output_size"])
    keep_ratio = bool(cfg["keep_ratio"])
    scale_range = cfg["scale_range"]
    scale_range = None if scale_range is None else tuple(scale_range)
    crop_size = _pair(cfg["crop_size"])
    max_ratio = float(cfg["one_category_max_ratio"])
    flip_prob = float(cfg["flip_prob"])
    pairs = tuple(tuple(int(c) for c in p) for p in cfg["flip_label_pairs"])
    rotation_prob = float(cfg["rotation_prob"])
    max_angle = int(cfg["rotation_max_angle"])
    photometric = _photometric_options(cfg["photometric_distortion"])
    pad_size = _pair(cfg["pad_size"])
    default_rng = rng

    def apply(sample: Mapping[str, Any], rng: np.random.Generator | None = None) -> Sample:
        rng = default_rng if rng is None else rng
        out = random_resize(sample, output_size, keep_ratio, scale_range, rng)
        out = random_crop(out, crop_size, rng, max_ratio, ignore)
        out = random_flip(out, rng, flip_prob, pairs)
        if rotation_prob > 0:  # the reference's pipeline has no rotation step otherwise
            out = random_rotation(out, rng, rotation_prob, max_angle, ignore)
        if photometric is not None:
            out = photometric_distortion(out, rng, **photometric)
        out = normalize(out, mean, std)
        out = pad(out, pad_size, ignore)
        out["label"] = np.asarray(out["label"], np.int32)
        return out

    return apply


def test_shape(dataset_config: Mapping[str, Any], shape: tuple[int, int]) -> tuple[int, int]:
    """(h, w) the test pipeline of ``config.dataset`` resizes an image of ``shape`` (h, w) to:
    ``test.output_size`` (None: unchanged) and ``test.keep_ratio``, see :func:`resized_shape`."""
    test = dataset_config["test"]
    output_size = test["output_size"]
    return resized_shape(
        tuple(shape),
        None if output_size is None else tuple(output_size),
        bool(test["keep_ratio"]),
    )


def eval_transform(dataset_config: Mapping[str, Any]) -> Transform:
    """Evaluation pipeline of ``config.dataset`` (uses ``test``, ``mean``, ``std``).

    Returns ``fn(sample) -> sample``: the image resized for ``test.output_size`` (no random
    scale) and normalised to float32; the label, if any, is returned unchanged at the
    original resolution (as int32), since the reference scores predictions resized back to it.
    """
    mean, std = tuple(dataset_config["mean"]), tuple(dataset_config["std"])

    def apply(sample: Mapping[str, Any]) -> Sample:
        image = sample["image"]
        shape = test_shape(dataset_config, image.shape[:2])
        if shape != image.shape[:2]:
            image = cv2.resize(image, shape[::-1], interpolation=cv2.INTER_LINEAR)
        out = _replace(sample, image=normalize_image(image, mean, std))
        if "label" in sample:
            out["label"] = np.asarray(sample["label"], np.int32)
        return out

    return apply


__all__ = [
    "CROP_TRIES",
    "IGNORE_LABEL",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "crop",
    "eval_transform",
    "hflip",
    "normalize",
    "normalize_image",
    "pad",
    "photometric_distortion",
    "random_crop",
    "random_flip",
    "random_resize",
    "random_rotation",
    "resize",
    "resized_shape",
    "test_shape",
    "rotate",
    "train_transform",
]

"""TFDS builders storing Cityscapes, ADE20K, COCO-Stuff-10k and LIP as ``array_record`` files.

Each builder (``mcibi_cityscapes``, ``mcibi_ade20k``, ``mcibi_cocostuff10k``, ``mcibi_lip``)
reads the official layout in its manual dir (the dataset root) through
:func:`~mcibi_jax.data.datasets.build_source` and writes one record per sample, in the
source's order (``disable_shuffling``), so record ``i`` of a split is ``build_source(...)[i]``:

* ``image``: the original file's bytes when it is an 8-bit RGB JPEG or PNG, otherwise the
  decoded RGB pixels (what ``build_source`` returns, e.g. for greyscale or CMYK JPEGs)
  encoded as PNG. Either way it decodes to exactly ``build_source``'s image.
* ``label``: the *mapped* class indices as a single-channel uint8 PNG with ignored pixels
  stored as 255 (:data:`STORED_IGNORE`); :class:`TfdsSource` turns 255 back into the ignore
  label (-100). Sets without labels store an all-255 label.
* ``id``: the sample id (text).

Neither building nor reading needs TensorFlow: images and labels are encoded and decoded with
Pillow here, and tensorflow-datasets writes and reads ``array_record`` files without it.
``tfds_source(name, split, data_dir)`` gives the random-access source the Grain pipeline takes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import operator
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

try:  # tensorflow-datasets 4.9.10 uses it for builders in packages, but newer etils no longer install it
    import importlib_resources  # noqa: F401
except ImportError as _error:
    raise ImportError(
        "mcibi_jax.data.tfds_builders needs importlib_resources next to tensorflow-datasets: "
        "pip install importlib_resources (or pip install -e '.[tfds]')"
    ) from _error

from mcibi_jax.data.datasets import (
    IGNORE_LABEL,
    SPECS,
    CorruptSample,
    DatasetConfigError,
    DatasetLayoutError,
    DatasetSpec,
    Source,
    build_source,
)
from mcibi_jax.data.datasets.core import DescribedBySpec, read_image

STORED_IGNORE = 255  # value of ignored pixels in the stored label PNGs
FILE_FORMAT = "array_record"
_INVALID = np.iinfo(np.int32).min


# ------------------------------------------------------------------------------------------
# Encoding


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_bytes(path: str, pixels: np.ndarray) -> bytes:
    """The file's bytes if it is an 8-bit RGB JPEG or PNG (decodes to ``pixels``), else a PNG of ``pixels``."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        keep = image.mode == "RGB" and (
            image.format == "JPEG" or (image.format == "PNG" and data[24] == 8)
        )
    return data if keep else _png(pixels)  # data[24]: the PNG header's bit depth


def encode_label(label: np.ndarray, ignore_label: int = IGNORE_LABEL) -> bytes:
    """(H, W) int class indices (``ignore_label`` = ignore) -> uint8 PNG with ignore stored as 255."""
    stored = np.where(label == ignore_label, STORED_IGNORE, label)
    if stored.size and (stored.min() < 0 or stored.max() > STORED_IGNORE):
        raise ValueError(f"label values must be in [0, {STORED_IGNORE}) or the ignore label")
    return _png(stored.astype(np.uint8))


def _ordered_map(fn: Callable[[int], Any], items: Iterable[int], num_threads: int) -> Iterator[Any]:
    """``map(fn, items)`` computed by ``num_threads`` threads, in order, at most 2 * threads ahead."""
    if num_threads <= 0:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * num_threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ------------------------------------------------------------------------------------------
# Builders


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared by the four builders; subclasses set ``DATASET``, ``SPLITS`` and ``DERIVED``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images as JPEG/PNG, mapped labels as uint8 PNG (255 = ignore), ids."}

    DATASET: str  # key of datasets.SPECS
    # (split, required, with_labels): stored splits; optional ones are skipped when absent
    SPLITS: tuple[tuple[str, bool, bool], ...]
    # split -> the stored splits it concatenates; stored itself only when the root lists it otherwise
    DERIVED: dict[str, tuple[str, ...]] = {}

    def __init__(
        self,
        *,
        num_threads: int = 4,
        log_every: int = 0,
        skip_corrupt: bool = False,
        splits: Iterable[str] | None = None,
        **kwargs: Any,
    ):
        """``num_threads``: threads encoding samples; ``log_every``: print progress every that many
        samples (0: never); ``skip_corrupt``: leave out samples that raise ``CorruptSample`` (with a
        printed warning) instead of failing; ``splits``: build only these; other arguments as
        for any TFDS builder (``data_dir``, ``file_format``, default ``array_record``)."""
        self.num_threads = int(num_threads)
        self.log_every = int(log_every)
        self.skip_corrupt = bool(skip_corrupt)
        self.only_splits = None if splits is None else tuple(splits)
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(**kwargs)

    @property
    def spec(self) -> DatasetSpec:
        return SPECS[self.DATASET]

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.spec
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"{spec.name} for mcibi_jax: the samples of mcibi_jax.data.datasets.build_source in its "
                f"order; label = class index in [0, {spec.num_classes}) or {STORED_IGNORE} (ignore)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    "label": tfds.features.Image(
                        shape=(None, None, 1),
                        dtype=np.uint8,
                        encoding_format="png",
                        use_colormap=True,
                    ),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # record i = build_source(...)[i]
            metadata=tfds.core.MetadataDict(
                dataset=spec.name,
                num_classes=spec.num_classes,
                ignore_value=STORED_IGNORE,
                class_names=list(spec.class_names),
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = Path(dl_manager.manual_dir)
        config = {"name": self.DATASET, "root": str(root)}
        wanted = self.only_splits
        known = [s for s, _, _ in self.SPLITS] + list(self.DERIVED)
        if wanted is not None:
            unknown = [s for s in wanted if s not in known]
            if unknown:
                raise DatasetConfigError(
                    f"{self.name} has no split {unknown[0]!r}; choose from {', '.join(known)}"
                )
            wanted = tuple(wanted) + sum((self.DERIVED[s] for s in wanted if s in self.DERIVED), ())
        generators: dict[str, Any] = {}
        ids: dict[str, list[str]] = {}
        for split, required, with_labels in self.SPLITS:
            try:
                source = build_source(config, split, with_labels=with_labels)
            except DatasetLayoutError as error:
                if required and (wanted is None or split in wanted):
                    raise
                if wanted is None or split in wanted:
                    print(f"[{self.name}] skipping split {split!r}: {error}", flush=True)
                continue
            ids[split] = [s.id for s in source.samples]
            if wanted is None or split in wanted:
                generators[split] = self._generate_examples(source)
        for split, parts in self.DERIVED.items():
            if wanted is not None and split not in wanted:
                continue
            try:
                source = build_source(config, split, check=False)
            except DatasetLayoutError:
                continue
            if all(p in ids for p in parts) and [s.id for s in source.samples] == sum(
                (ids[p] for p in parts), []
            ):
                continue  # read as "+".join(parts)
            print(
                f"[{self.name}] {split!r} is not {' + '.join(parts)} in this root: storing it too",
                flush=True,
            )
            check = build_source(config, split)
            generators[split] = self._generate_examples(check)
        if not generators:
            raise DatasetLayoutError(
                f"{self.name}: none of the splits {wanted} was found under {root}"
            )
        return generators

    def _generate_examples(self, source: Source) -> Iterator[tuple[int, dict[str, Any]]]:
        name, total, start = f"{self.name}/{source.split}", len(source), time.monotonic()
        if self.log_every:
            print(f"[{name}] encoding {total} samples ...", flush=True)

        def encode(index: int) -> tuple[int, dict[str, Any] | CorruptSample]:
            try:
                sample = source[index]
                image = _image_bytes(source.samples[index].image, sample["image"])
            except CorruptSample as error:
                return index, error
            return index, {
                "image": image,
                "label": encode_label(sample["label"], source.ignore_label),
                "id": sample["id"],
            }

        skipped = 0
        for done, (index, example) in enumerate(
            _ordered_map(encode, range(total), self.num_threads), 1
        ):
            if isinstance(example, CorruptSample):
                if not self.skip_corrupt:
                    raise example
                skipped += 1
                print(f"[{name}] skipping corrupt sample {index}: {example}", flush=True)
            else:
                yield index, example  # integer keys: records are written in key order
            if self.log_every and (done % self.log_every == 0 or done == total):
                rate = done / max(time.monotonic() - start, 1e-9)
                print(
                    f"[{name}] {done}/{total} samples ({rate:.1f}/s, {skipped} skipped)", flush=True
                )


_INSTRUCTIONS = (
    "Pass the dataset root (the folder build_source reads, see docs/datasets.md) as the "
    "manual dir, e.g. `python -m mcibi_jax.data.prepare --config=configs/{name}.py --data_dir=DIR`."
)


class McibiCityscapes(_Builder):
    """Cityscapes (19 classes); ``trainval`` is read as ``train+val``."""

    name = "mcibi_cityscapes"
    DATASET = "cityscapes"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(name="cityscapes")
    SPLITS = (("train", True, True), ("val", True, True), ("test", False, True))
    DERIVED = {"trainval": ("train", "val")}


class McibiAde20k(_Builder):
    """ADE20K SceneParsing (150 classes); ``test`` (no labels) only when its images are there."""

    name = "mcibi_ade20k"
    DATASET = "ade20k"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(name="ade20k")
    SPLITS = (("train", True, True), ("val", True, True), ("test", False, False))


class McibiCocostuff10k(_Builder):
    """COCO-Stuff-10k v1.1 (182 classes); ``all`` is read as ``train+test``."""

    name = "mcibi_cocostuff10k"
    DATASET = "cocostuff10k"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(name="cocostuff10k")
    SPLITS = (("train", True, True), ("test", True, True))
    DERIVED = {"all": ("train", "test")}


class McibiLip(_Builder):
    """LIP (20 classes); ``test`` (no labels) only when its images are there."""

    name = "mcibi_lip"
    DATASET = "lip"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(name="lip")
    SPLITS = (("train", True, True), ("val", True, True), ("test", False, False))


BUILDERS: dict[str, type[_Builder]] = {
    b.DATASET: b for b in (McibiCityscapes, McibiAde20k, McibiCocostuff10k, McibiLip)
}


def builder_class(name: str) -> type[_Builder]:
    """The builder of a dataset, by dataset name (``"ade20k"``) or TFDS name (``"mcibi_ade20k"``)."""
    key = name[len("mcibi_") :] if name.startswith("mcibi_") else name
    if key not in BUILDERS:
        raise DatasetConfigError(f"unknown dataset {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[key]


# ------------------------------------------------------------------------------------------
# Reading


class TfdsSource(DescribedBySpec):
    """Random-access samples of one prepared split, the same dicts as ``build_source`` gives.

    ``source[i]`` is ``{"image": (H, W, 3) uint8 RGB, "label": (H, W) int32, "id": str}``
    with labels in ``[0, num_classes)`` or ``ignore_label``. A record that does not decode
    raises :class:`CorruptSample`. Pickles (the records are reopened in the new process), so
    Grain worker processes can have copies.
    """

    def __init__(
        self, name: str, split: str, data_dir: str | Path, *, ignore_label: int = IGNORE_LABEL
    ):
        builder_cls = builder_class(name)
        self.spec: DatasetSpec = SPECS[builder_cls.DATASET]
        self.builder_name = builder_cls.name
        self.split = split
        self.data_dir = str(data_dir)
        self.ignore_label = int(ignore_label)
        table = np.full((256,), _INVALID, dtype=np.int32)
        table[: self.spec.num_classes] = np.arange(self.spec.num_classes)
        table[STORED_IGNORE] = self.ignore_label
        self._table = table
        self._records = self._open()

    def _open(self) -> Any:
        builder_cls = builder_class(self.builder_name)
        builder = builder_cls(data_dir=self.data_dir)
        if not builder.is_prepared():
            raise DatasetLayoutError(
                f"no prepared {self.builder_name} records in {self.data_dir} (looked for {builder.data_dir}); "
                f"build them with `python -m mcibi_jax.data.prepare --config=configs/{self.spec.name}.py "
                f"--data_dir={self.data_dir}`"
            )
        stored = builder.info.splits
        if self.split in stored:
            tfds_split = self.split
        elif self.split in builder_cls.DERIVED and all(
            p in stored for p in builder_cls.DERIVED[self.split]
        ):
            tfds_split = "+".join(builder_cls.DERIVED[self.split])
        else:
            raise DatasetConfigError(
                f"{self.builder_name} in {self.data_dir} has no split {self.split!r}; "
                f"prepared: {', '.join(stored)}"
            )
        skip = tfds.decode.SkipDecoding()
        self.tfds_split = tfds_split
        self.location = f"{builder.data_dir}[{tfds_split}]"
        return builder.as_data_source(split=tfds_split, decoders={"image": skip, "label": skip})

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        size = len(self._records)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for {size} records of {self.location}")
        index %= size
        record = self._records[index]
        sample_id = (
            record["id"].decode("utf-8") if isinstance(record["id"], bytes) else str(record["id"])
        )
        where = f"{self.location}/{index}"
        try:
            image = read_image(io.BytesIO(record["image"]), sample_id)
        except CorruptSample as error:
            raise CorruptSample(where, error.reason, sample_id) from None
        try:
            with Image.open(io.BytesIO(record["label"])) as decoded:
                if decoded.mode != "L":
                    raise CorruptSample(
                        where, f"stored label has mode {decoded.mode!r}, expected 'L'", sample_id
                    )
                stored = np.array(decoded, dtype=np.uint8)
        except CorruptSample:
            raise
        except Exception as error:  # PIL raises many types for damaged data
            raise CorruptSample(where, f"cannot decode stored label: {error}", sample_id) from error
        if stored.shape != image.shape[:2]:
            raise CorruptSample(
                where, f"label is {stored.shape} but image {image.shape[:2]}", sample_id
            )
        label = self._table[stored]
        if (label == _INVALID).any():
            raise CorruptSample(
                where,
                f"stored label values {np.unique(stored[label == _INVALID])[:10].tolist()} "
                f"are not classes of {self.name}",
                sample_id,
            )
        return {"image": image, "label": label, "id": sample_id}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_records"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._records = self._open()

    def __repr__(self) -> str:
        return f"TfdsSource({self.builder_name!r}, split={self.split!r}, {len(self)} records in {self.data_dir})"


def tfds_source(
    name: str, split: str, data_dir: str | Path, *, ignore_label: int = IGNORE_LABEL
) -> TfdsSource:
    """The prepared records of one split as a random-access source (like ``build_source``'s).

    Args:
      name: ``"ade20k"`` or ``"mcibi_ade20k"`` (likewise cityscapes, cocostuff10k, lip).
      split: as for ``build_source``; Cityscapes' ``trainval`` and COCO-Stuff's ``all`` are
        read as the stored ``train+val`` / ``train+test`` (unless prepared separately).
      data_dir: the ``--data_dir`` the records were prepared into. Tested with local paths;
        a ``gs://`` path is untested (it needs gcsfs for the metadata and an array_record
        build that reads GCS); copying the folder to local disk always works.
      ignore_label: what ignored pixels become (default -100).

    Raises:
      DatasetLayoutError: nothing is prepared there. DatasetConfigError: unknown name or split.
    """
    return TfdsSource(name, split, data_dir, ignore_label=ignore_label)

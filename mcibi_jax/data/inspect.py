"""Checks a dataset's files and prints its class frequencies and image sizes.

    python -m mcibi_jax.data.inspect --config=configs/custom_template.py:r50 \\
        --config.dataset.root=/data/my_set [--split=train] [--max_listed=20] [--workers=8] \\
        [--no_labels] [--quiet]

Works for every dataset kind of :mod:`mcibi_jax.data.datasets` (cityscapes, ade20k,
cocostuff10k, lip, custom). Each sample of the split is decoded: missing images or masks,
unreadable files, image/mask size mismatches and mask ids outside the class list are listed
with their files (the first ``--max_listed`` of each kind, then a count). Then the
class-frequency table (pixels and images per class) and image-size statistics are printed.

The flags are absl flags, spelled with underscores (``--max_listed``, ``--no_labels``; the
hyphenated ``--max-listed`` and ``--no-labels`` are gone); ``--help`` lists them.

Exit status: 0 no problems, 1 problems found, 2 the config or the dataset layout cannot be used.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import numpy as np
from absl import flags

from mcibi_jax.command_line import CommandLine
from mcibi_jax.data.datasets import CorruptSample, DatasetError, Source, build_source
from mcibi_jax.data.datasets.core import Sample, read_image
from mcibi_jax.progress import ProgressBar

EXIT_CLEAN, EXIT_PROBLEMS, EXIT_UNUSABLE = 0, 1, 2

# Problem kinds, in report order.
MISSING, UNREADABLE, SIZE, UNKNOWN_IDS, DUPLICATE = (
    "missing",
    "unreadable",
    "size",
    "ids",
    "duplicate",
)
PROBLEM_TITLES = {
    MISSING: "missing image or mask (no pair)",
    UNREADABLE: "unreadable files",
    SIZE: "image/mask size mismatches",
    UNKNOWN_IDS: "mask ids outside the class list",
    DUPLICATE: "names listed more than once",
}


@dataclasses.dataclass
class Problem:
    kind: str
    sample_id: str
    path: str
    detail: str


@dataclasses.dataclass
class _SampleResult:
    problems: list[Problem]
    image_size: tuple[int, int] | None  # (h, w) when the image decoded
    class_pixels: np.ndarray | None  # (num_classes,) int64 when the mask decoded
    ignored_pixels: int = 0


@dataclasses.dataclass
class Report:
    """What :func:`inspect_source` found in one split."""

    num_samples: int
    class_names: tuple[str, ...]
    problems: list[Problem]
    class_pixels: np.ndarray  # (K,) int64 labelled pixels per class
    class_images: np.ndarray  # (K,) int64 samples holding the class
    ignored_pixels: int
    image_sizes: list[tuple[int, int]]  # (h, w) of every decodable image
    labelled_samples: int  # samples whose mask decoded

    @property
    def clean(self) -> bool:
        return not self.problems

    def problems_by_kind(self) -> dict[str, list[Problem]]:
        grouped: dict[str, list[Problem]] = {kind: [] for kind in PROBLEM_TITLES}
        for problem in self.problems:
            grouped[problem.kind].append(problem)
        return {kind: items for kind, items in grouped.items() if items}


def _check_sample(source: Source, sample: Sample) -> _SampleResult:
    spec, problems = source.spec, []
    image_ok = os.path.isfile(sample.image)
    label_ok = sample.label is None or os.path.isfile(sample.label)
    if not image_ok:
        problems.append(Problem(MISSING, sample.id, sample.image, "image file does not exist"))
    if not label_ok:
        problems.append(
            Problem(
                MISSING, sample.id, sample.label, f"mask file does not exist (image {sample.image})"
            )
        )
    size = None
    if image_ok:
        try:
            size = tuple(read_image(sample.image, sample.id).shape[:2])
        except CorruptSample as error:
            problems.append(Problem(UNREADABLE, sample.id, error.path, error.reason))
    if sample.label is None or not label_ok:
        return _SampleResult(problems, size, None)
    try:
        raw = np.asarray(spec.read_label(sample.label, sample.id))
    except CorruptSample as error:
        problems.append(Problem(UNREADABLE, sample.id, error.path, error.reason))
        return _SampleResult(problems, size, None)
    if size is not None and raw.shape[:2] != size:
        problems.append(
            Problem(
                SIZE,
                sample.id,
                sample.label,
                f"mask is {raw.shape[0]}x{raw.shape[1]} but image {sample.image} is {size[0]}x{size[1]}",
            )
        )
    if raw.dtype.kind == "u" and raw.dtype.itemsize == 1:
        counts = np.bincount(raw.ravel(), minlength=256)
        ids = np.flatnonzero(counts)
        counts = counts[ids]
    else:
        ids, counts = np.unique(raw, return_counts=True)
    class_pixels = np.zeros(spec.num_classes, dtype=np.int64)
    ignored, unknown = 0, []
    for raw_id, count in zip(ids.tolist(), counts.tolist()):
        if raw_id != raw_id or raw_id not in spec.label_map:  # NaN or no entry
            unknown.append((raw_id, count))
            continue
        target = spec.label_map[raw_id]
        if target is None:
            ignored += count
        else:
            class_pixels[target] += count
    if unknown:
        shown = ", ".join(f"{i} ({n} px)" for i, n in unknown[:10]) + (
            ", ..." if len(unknown) > 10 else ""
        )
        problems.append(
            Problem(
                UNKNOWN_IDS,
                sample.id,
                sample.label,
                f"ids {shown} are not classes of {spec.name} ({spec.num_classes} classes)",
            )
        )
    return _SampleResult(problems, size, class_pixels, ignored)


def inspect_source(
    source: Source, *, workers: int = 4, progress: TextIO | None = None, progress_every: float = 5.0
) -> Report:
    """Decodes every sample of ``source`` and collects problems and statistics.

    Args:
      source: from :func:`build_source` (with ``check=False`` so missing files are reported
        here rather than raised).
      workers: threads decoding samples (Pillow releases the GIL while decoding).
      progress: where progress goes (None: nowhere): a live bar on a terminal, else a line every
        ``progress_every`` seconds.
    """
    num_classes = source.num_classes
    problems: list[Problem] = []
    seen: collections.Counter[str] = collections.Counter(s.id for s in source.samples)
    for name, count in seen.items():
        if count > 1:
            problems.append(Problem(DUPLICATE, name, name, f"listed {count} times"))
    class_pixels = np.zeros(num_classes, dtype=np.int64)
    class_images = np.zeros(num_classes, dtype=np.int64)
    ignored, sizes, labelled = 0, [], 0
    bar = ProgressBar(
        len(source),
        "inspecting",
        stream=progress,
        enabled=None if progress is not None else False,
        log_every=progress_every,
    )

    def check(sample: Sample) -> _SampleResult:
        return _check_sample(source, sample)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool, bar:
        for result in _ordered(pool, check, source.samples, max(1, workers) * 4):
            problems.extend(result.problems)
            if result.image_size is not None:
                sizes.append(result.image_size)
            if result.class_pixels is not None:
                labelled += 1
                class_pixels += result.class_pixels
                class_images += result.class_pixels > 0
                ignored += result.ignored_pixels
            bar.update()
    return Report(
        len(source),
        source.class_names,
        problems,
        class_pixels,
        class_images,
        ignored,
        sizes,
        labelled,
    )


def _ordered(
    pool: concurrent.futures.Executor, fn: Callable[[Any], Any], items: Sequence[Any], window: int
) -> Iterable[Any]:
    """``map(fn, items)`` on ``pool`` with at most ``window`` items in flight."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ------------------------------------------------------------------------------------------
# Printing


def format_report(report: Report, *, max_listed: int = 20) -> str:
    lines = []
    grouped = report.problems_by_kind()
    if grouped:
        bad = len({p.sample_id for p in report.problems})
        lines.append(f"PROBLEMS: {len(report.problems)} in {bad} of {report.num_samples} samples")
        for kind, items in grouped.items():
            lines.append(f"  {PROBLEM_TITLES[kind]}: {len(items)}")
            for p in items[:max_listed]:
                lines.append(f"    {p.sample_id}: {p.path}: {p.detail}")
            if len(items) > max_listed:
                lines.append(f"    ... and {len(items) - max_listed} more")
    else:
        lines.append(f"no problems in {report.num_samples} samples")

    lines.append("")
    labelled_pixels = int(report.class_pixels.sum())
    total = labelled_pixels + report.ignored_pixels
    if report.labelled_samples:
        ignored_share = 100.0 * report.ignored_pixels / total if total else 0.0
        lines.append(
            f"class frequencies over {report.labelled_samples} masks: {labelled_pixels} labelled pixels, "
            f"{report.ignored_pixels} ignored ({ignored_share:.2f}% of all)"
        )
        width = max([len("class")] + [len(n) for n in report.class_names])
        width = min(width, 40)
        lines.append(
            f"  {'id':>3}  {'class':<{width}}  {'pixels':>14}  {'share %':>8}  {'images':>8}  {'images %':>8}"
        )
        for k, name in enumerate(report.class_names):
            pixels, images = int(report.class_pixels[k]), int(report.class_images[k])
            share = 100.0 * pixels / labelled_pixels if labelled_pixels else 0.0
            image_share = 100.0 * images / report.labelled_samples
            shown = name if len(name) <= width else name[: width - 3] + "..."
            lines.append(
                f"  {k:>3}  {shown:<{width}}  {pixels:>14}  {share:>8.2f}  {images:>8}  {image_share:>8.2f}"
            )
        absent = [name for k, name in enumerate(report.class_names) if report.class_images[k] == 0]
        if absent:
            lines.append(
                f"  classes that never occur: {len(absent)} ({'; '.join(absent[:10])}"
                f"{', ...' if len(absent) > 10 else ''})"
            )
    else:
        lines.append("no masks were read: no class frequencies")

    lines.append("")
    if report.image_sizes:
        sizes = np.asarray(report.image_sizes, dtype=np.int64)
        h, w = sizes[:, 0], sizes[:, 1]
        lines.append(f"image sizes over {len(sizes)} images (height x width):")
        lines.append(
            f"  height min {h.min()}, mean {h.mean():.1f}, max {h.max()}; "
            f"width min {w.min()}, mean {w.mean():.1f}, max {w.max()}"
        )
        short, long = np.minimum(h, w), np.maximum(h, w)
        lines.append(
            f"  short side min {short.min()}, median {int(np.median(short))}, max {short.max()}; "
            f"long side min {long.min()}, median {int(np.median(long))}, max {long.max()}"
        )
        common = collections.Counter(map(tuple, sizes.tolist())).most_common(5)
        lines.append("  most common: " + ", ".join(f"{a}x{b} ({n})" for (a, b), n in common))
    else:
        lines.append("no image could be read: no size statistics")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Command line


def _error(message: str, stream: TextIO) -> int:
    print(f"error: {message}", file=stream, flush=True)
    return EXIT_UNUSABLE


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Runs the command line (``argv`` without the program name) and returns the exit status."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    command = CommandLine(
        "python -m mcibi_jax.data.inspect",
        __doc__,
        config="config file[:arg], e.g. configs/custom_template.py:r50",
    )
    fv = command.flags
    flags.DEFINE_string(
        "split", None, "split to check (default: config.dataset.train_set)", flag_values=fv
    )
    flags.DEFINE_integer(
        "max_listed", 20, "problems listed per kind before only counting", flag_values=fv
    )
    flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "decoding threads", flag_values=fv)
    flags.DEFINE_bool(
        "no_labels",
        False,
        "the split has no masks (e.g. a test set): check images only",
        flag_values=fv,
    )
    flags.DEFINE_bool("quiet", False, "no progress (bar or lines) on stderr", flag_values=fv)
    try:
        command.parse(argv, stdout=stdout, stderr=stderr)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return EXIT_UNUSABLE if exit_.code else EXIT_CLEAN
    config = command.config
    try:
        dataset = config["dataset"]
        name = dataset.get("name")
        split = fv.split or dataset.get("train_set")
        if not split:
            return _error("give --split=<name> (the config has no dataset.train_set)", stderr)
        source = build_source(dataset, split, with_labels=not fv.no_labels, check=False)
    except (ValueError, KeyError, DatasetError, FileNotFoundError) as error:
        # ConfigError is a ValueError
        return _error(str(error), stderr)
    root = dataset.get("root")
    print(
        f"{name} split {split!r} at {root}: {len(source)} samples, {source.num_classes} classes",
        file=stdout,
        flush=True,
    )
    report = inspect_source(source, workers=fv.workers, progress=None if fv.quiet else stderr)
    print(format_report(report, max_listed=max(0, fv.max_listed)), file=stdout, flush=True)
    return EXIT_CLEAN if report.clean else EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())

"""The 18 released MCIBI checkpoints by name: download once, check, port once, reuse.

    python -m mcibi_jax.pretrained                 # the table: names, published mIoU, what is cached
    python -m mcibi_jax.pretrained ade20k:r50      # download and port now (e.g. before going offline)

``Segmenter.from_pretrained("ade20k:r50")``, ``predict --pretrained=``, ``port --pretrained=``
and ``main --config.train.init_from=pretrained:ade20k:r50`` all go through :func:`checkpoint`
or :func:`download`. Names are ``<dataset>:<backbone>`` with the configs' backbone arguments
(``r50 r101 s101 hrnet48 vitl``; no ViT-L for Cityscapes and LIP).

The cache is ``$MCIBI_CACHE`` (default ``~/.cache/mcibi_jax``) and holds, per model,

    deeplabv3_r50_ade20k.pth        the released file, as downloaded
    deeplabv3_r50_ade20k.pth.json   its size and sha256, recorded on the first download
    deeplabv3_r50_ade20k.orbax/     the variables ported to our model (made once, then reused)

A download goes to ``<file>.part`` and is renamed when complete and checked; an interrupted
one resumes where it stopped on the next call (HTTP Range, with If-Range on the first response's
ETag kept in ``<file>.part.etag``, so a file changed meanwhile is downloaded whole again). ``$MCIBI_PRETRAINED_URL`` replaces
the base URL (a mirror). Without network the error says where to put the file by hand; a file
put there is recorded (size, sha256) on first use like a download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from mcibi_jax import command_line  # a module import: command_line uses this module too
from mcibi_jax.config import ConfigError, load_config
from mcibi_jax.porting.convert import PortError
from mcibi_jax.porting.pth import PthError
from mcibi_jax.porting.variables import load_variables as load_ported
from mcibi_jax.porting.variables import save_variables, variables_from_pth
from mcibi_jax.progress import ProgressBar
from mcibi_jax.recipes import PUBLISHED_MIOU, RELEASED, config_file

BASE_URL = "https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_memorynet"
URL_ENV = "MCIBI_PRETRAINED_URL"
CACHE_ENV = "MCIBI_CACHE"
PREFIX = "pretrained:"  # train.init_from=pretrained:<name>
TIMEOUT = 60.0  # seconds without data before a download gives up (it resumes on the next call)
_CHUNK = 1 << 20
# The release's file names spell some backbones differently from our config arguments.
_FILE_BACKBONE = {
    "r50": "r50",
    "r101": "r101",
    "s101": "s101",
    "hrnet48": "hrnetv2w48",
    "vitl": "vitlarge",
}


class PretrainedError(RuntimeError):
    """A released checkpoint that cannot be downloaded, checked or ported (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Release:
    """One released checkpoint: ``name`` ``<dataset>:<backbone>``, its file in the model store
    and the published mIoU (%) single-scale (None: Cityscapes publishes only the TTA number)
    and multi-scale + flip (LIP: flip only)."""

    name: str
    file: str
    miou: float | None
    miou_tta: float

    def url(self) -> str:
        return f"{(os.environ.get(URL_ENV) or BASE_URL).rstrip('/')}/{self.file}"

    def config_spec(self) -> str:
        """``<configs folder>/<dataset>.py:<backbone>``: the released recipe, as ``--config``."""
        dataset, backbone = self.name.split(":")
        return f"{config_file(dataset)}:{backbone}"

    def config(self) -> ml_collections.ConfigDict:
        """The experiment config the weights belong to (locked)."""
        return load_config(self.config_spec())


def _release(dataset: str, backbone: str) -> Release:
    single, tta = PUBLISHED_MIOU[(dataset, backbone)]
    return Release(
        f"{dataset}:{backbone}", f"deeplabv3_{_FILE_BACKBONE[backbone]}_{dataset}.pth", single, tta
    )


RELEASES: dict[str, Release] = {f"{d}:{b}": _release(d, b) for d, b in RELEASED}


def get(name: str) -> Release:
    """The release called ``name`` (e.g. ``"ade20k:r50"``); ConfigError listing the names otherwise."""
    name = str(name).strip()
    if name.startswith(PREFIX):
        name = name[len(PREFIX) :]
    if name not in RELEASES:
        raise ConfigError(f"no released checkpoint {name!r}; choose one of {', '.join(RELEASES)}")
    return RELEASES[name]


def config(name: str) -> ml_collections.ConfigDict:
    """The experiment config of the released checkpoint ``name``."""
    return get(name).config()


def cache_dir() -> Path:
    """``$MCIBI_CACHE``, else ``~/.cache/mcibi_jax``."""
    return (
        Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mcibi_jax")
        .expanduser()
        .absolute()
    )


def cached_file(name: str) -> Path:
    """Where the released ``.pth`` of ``name`` is (or goes) in the cache."""
    return cache_dir() / get(name).file


def _record_path(file: Path) -> Path:
    return file.with_name(file.name + ".json")


def _ported_path(file: Path) -> Path:
    return file.with_suffix(".orbax")


# --------------------------------------------------------------------------------------------
# Integrity: size and sha256 recorded on the first download, checked after.


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_record(file: Path) -> dict[str, Any] | None:
    path = _record_path(file)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        return {"size": int(record["size"]), "sha256": str(record["sha256"])}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PretrainedError(
            f"{path} is unreadable ({error}); delete it to record {file.name} anew"
        ) from None


def _write_record(file: Path, url: str, size: int, sha256: str) -> None:
    record = {
        "file": file.name,
        "url": url,
        "size": size,
        "sha256": sha256,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    temporary = _record_path(file).with_suffix(f".tmp-{os.getpid()}")
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temporary, _record_path(file))


def verify(name: str, full: bool = True) -> Path:
    """The cached ``.pth`` of ``name``, checked against its record (size; and sha256 if ``full``).
    A file without a record (put there by hand) gets one now. PretrainedError if it is missing
    or does not match."""
    release = get(name)
    file = cached_file(name)
    if not file.exists():
        raise PretrainedError(f"{release.name} is not downloaded: no {file}")
    record = _read_record(file)
    size = file.stat().st_size
    if record is None:
        _write_record(file, "(put in the cache by hand)", size, _sha256(file))
        return file
    if size != record["size"]:
        raise PretrainedError(
            f"{file} has {size:,} bytes, its record {_record_path(file).name} says {record['size']:,}: "
            "the file is damaged or was replaced; delete it to download it again"
        )
    if full:
        sha = _sha256(file)
        if sha != record["sha256"]:
            raise PretrainedError(
                f"{file} has sha256 {sha[:16]}..., its record {_record_path(file).name} says "
                f"{record['sha256'][:16]}...: the file is damaged; delete it to download it again"
            )
    return file


# --------------------------------------------------------------------------------------------
# Download


@contextlib.contextmanager
def _locked(file: Path) -> Iterator[None]:
    """Holds ``<file>.lock`` so that two processes (hosts on a shared disk) never write the same
    download or port at once."""
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(file.with_name(file.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _by_hand(release: Release, file: Path) -> str:
    return (
        f"download {release.url()} elsewhere and put it at {file} "
        f"(or set {CACHE_ENV} to a folder holding {file.name})"
    )


def _total_size(response: Any, offset: int) -> tuple[int, int | None]:
    """(offset the body starts at, total size of the file or None) of a 200 or 206 response."""
    if response.status == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match is None:
            raise PretrainedError(
                f"the server answered a resumed download with Content-Range "
                f"{response.headers.get('Content-Range')!r}"
            )
        start, total = int(match.group(1)), match.group(2)
        return start, (None if total == "*" else int(total))
    length = response.headers.get("Content-Length")
    return 0, (int(length) if length and length.isdigit() else None)


def _fetch(
    release: Release, file: Path, expected_size: int | None, log: Callable[[str], None]
) -> None:
    """Downloads into ``<file>.part`` (resuming what is there); returns when it holds the whole file."""
    part = file.with_name(file.name + ".part")
    validator = part.with_name(part.name + ".etag")  # the version the part belongs to (If-Range)
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset == expected_size:
        return
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    url = release.url()
    headers = {"User-Agent": "mcibi_jax"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if (
            validator.exists()
        ):  # a changed file on the server comes whole (200) instead of a mixed part
            headers["If-Range"] = validator.read_text().strip()
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT
        )
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing left to send: the part is complete, or stale
            match = re.match(r"bytes \*/(\d+)", error.headers.get("Content-Range", "") or "")
            if match and int(match.group(1)) == offset:
                return
            part.unlink()
            raise PretrainedError(
                f"{url}: the server refused to resume at byte {offset:,}; the partial download "
                "was removed, run again to download from the start"
            ) from None
        raise PretrainedError(
            f"cannot download {release.name} (HTTP {error.code} {error.reason}): "
            f"{_by_hand(release, file)}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        reason = getattr(reason, "strerror", None) or reason
        raise PretrainedError(
            f"cannot download {release.name} ({reason}): {_by_hand(release, file)}"
        ) from None
    with response:
        start, total = _total_size(response, offset)
        if (
            start != offset
        ):  # a 200 (no resume, or the file changed) or an unexpected range: start over
            offset = 0
        if not offset:
            tag = response.headers.get("ETag") or response.headers.get("Last-Modified")
            if tag:
                validator.write_text(tag)
            else:
                validator.unlink(missing_ok=True)
        if expected_size is not None and total is not None and total != expected_size:
            raise PretrainedError(
                f"{url} offers {total:,} bytes but {file.name} was recorded with {expected_size:,} "
                f"({_record_path(file)}); the release changed or the mirror is wrong"
            )
        total = total if total is not None else expected_size
        megabytes = -(-total // (1 << 20)) if total else 0
        verb = "resuming" if offset else "downloading"
        log(
            f"{verb} {release.name}: {url} -> {file}"
            + (f" ({total / (1 << 20):.1f} MiB)" if total else "")
        )
        received = offset
        with (
            open(part, "ab" if offset else "wb") as out,
            ProgressBar(megabytes, f"{file.name} MiB") as bar,
        ):
            bar.set_position(offset >> 20)
            try:
                while True:
                    block = response.read(_CHUNK)
                    if not block:
                        break
                    out.write(block)
                    before, received = received, received + len(block)
                    bar.update((received >> 20) - (before >> 20))
            except (OSError, http.client.HTTPException) as error:  # dropped connection, timeout
                out.flush()
                raise PretrainedError(
                    f"the download of {release.name} stopped at {received:,}"
                    + (f" of {total:,}" if total else "")
                    + f" bytes ({type(error).__name__}); "
                    f"run again to resume it (kept in {part})"
                ) from None
    if total is not None and received != total:
        raise PretrainedError(
            f"the download of {release.name} stopped at {received:,} of {total:,} bytes; "
            f"run again to resume it (kept in {part})"
        )
    validator.unlink(missing_ok=True)


def download(name: str, log: Callable[[str], None] = print) -> Path:
    """The released ``.pth`` of ``name`` in the cache, downloaded if needed (resuming a partial
    download) and checked against its recorded size and sha256 (recorded on the first download).
    Raises PretrainedError with a one-line message (where to put the file by hand when offline)."""
    release = get(name)
    file = cached_file(name)
    with _locked(file):
        if file.exists():
            return verify(name)
        record = _read_record(file)
        _fetch(release, file, None if record is None else record["size"], log)
        part = file.with_name(file.name + ".part")
        size, sha = part.stat().st_size, _sha256(part)
        if record is not None and (size, sha) != (record["size"], record["sha256"]):
            part.unlink()
            raise PretrainedError(
                f"the download of {release.name} does not match its record {_record_path(file)} "
                f"(size {size:,}, sha256 {sha[:16]}... instead of {record['size']:,}, "
                f"{record['sha256'][:16]}...); removed it, run again to download it anew"
            )
        if record is None:
            _write_record(file, release.url(), size, sha)
        os.replace(part, file)
        log(f"{release.name}: {size:,} bytes, sha256 {sha[:16]}... -> {file}")
        return file


def checkpoint(name: str, log: Callable[[str], None] = print) -> Path:
    """The orbax checkpoint of the released model ``name`` (ported from its ``.pth`` the first
    time, strictly against its released config, then reused)."""
    release = get(name)
    file = cached_file(name)
    ported = _ported_path(file)
    if ported.is_dir():
        return ported
    source = download(name, log)
    with _locked(file):
        if ported.is_dir():  # another process ported it meanwhile
            return ported
        temporary = ported.with_name(f"{ported.name}.tmp-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            save_variables(temporary, variables_from_pth(source, release.config()))
            os.replace(temporary, ported)
        except (PortError, PthError) as error:
            raise PretrainedError(f"cannot port {release.name}: {error}") from None
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    log(f"{release.name}: ported once to {ported}")
    return ported


def load_variables(
    name: str, config: ml_collections.ConfigDict | None = None, log: Callable[[str], None] = print
) -> dict:
    """Flax variables of the released model ``name``, checked against ``config``'s model
    (default: the release's own config)."""
    return load_ported(checkpoint(name, log), config if config is not None else get(name).config())


# --------------------------------------------------------------------------------------------
# Command line


def _table() -> str:
    rows = [f"{'name':<20} {'mIoU':>6} {'TTA':>6}  cached"]
    for release in RELEASES.values():
        file = cache_dir() / release.file
        state = (
            "ported"
            if _ported_path(file).is_dir()
            else "downloaded"
            if file.exists()
            else "partial"
            if file.with_name(file.name + ".part").exists()
            else "-"
        )
        single = f"{release.miou:.2f}" if release.miou is not None else "-"
        rows.append(f"{release.name:<20} {single:>6} {release.miou_tta:>6.2f}  {state}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    command = command_line.CommandLine("python -m mcibi_jax.pretrained", __doc__)
    names = command.parse(argv, positional=True)
    if not names:
        print(_table())
        print(
            f"cache: {cache_dir()}  (published mIoU in %; Cityscapes: test server, multi-scale + flip)"
        )
        return 0
    try:
        for name in names:
            print(f"{get(name).name}: {checkpoint(name)}")
    except (ConfigError, PretrainedError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

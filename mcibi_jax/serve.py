"""Try a model in the browser: a small web page and a JSON / PNG HTTP endpoint.

    python -m mcibi_jax.serve --config=configs/demo.py --checkpoint=/tmp/mcibi_demo
    python -m mcibi_jax.serve --config=configs/ade20k.py:r50 --checkpoint=ckpt/r50_ade20k --port=8000

Then open http://127.0.0.1:8000/ (``--host=0.0.0.0`` to let other machines in: there is no
authentication). ``--pth=FILE`` reads a released PyTorch checkpoint instead of
``--checkpoint=DIR`` (an orbax checkpoint, or a training workdir: its best checkpoint);
``--pretrained=ade20k:r50`` takes a released model by name (``--config`` then defaults to its
recipe); ``--config.<key>=<value>`` changes the config, as in every command (``--help`` lists
the flags). Built on the standard library's
``http.server``; every image goes through :meth:`mcibi_jax.Segmenter.predict` (the config's
test pipeline and inference settings; ``--tta``: the ``eval.tta_*`` ones).

Endpoints:

    GET  /              the page: drop or choose an image, see the overlay (opacity slider),
                        the legend (each class's colour and share of the pixels), download the
                        label PNG
    GET  /api/info      {"name", "num_classes", "classes": [{"id", "name", "colour"}],
                        "background", "max_bytes", "max_pixels"}
    POST /api/segment   the image file as the request body (any format Pillow reads), e.g.
                        curl --data-binary @photo.jpg 'http://127.0.0.1:8000/api/segment?format=labels' -o labels.png
        ?format=json    (default) {"width", "height", "seconds", "classes": [{"id", "name",
                        "colour", "share"}] (present classes, largest first), "labels_png" (the
                        class ids, 8-bit grey PNG; 16-bit beyond 256 classes), "mask_png" (RGBA
                        colours, the background class transparent), both base64}
        ?format=labels  the class-id PNG itself
        ?format=mask    the RGBA colour PNG itself
        ?format=overlay the image blended with the mask as a PNG (``&alpha=0.5``)

Errors are JSON ``{"error": "..."}``: 400 (not an image, empty body, bad parameter), 413 (more
than ``--max_mb`` megabytes or ``--max_pixels`` pixels), 404, 500.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from absl import flags
from PIL import Image

from mcibi_jax import compilation_cache
from mcibi_jax.command_line import CommandLine
from mcibi_jax.config import ConfigError
from mcibi_jax.data.classes import class_names, dataset_palette
from mcibi_jax.evaluation.inference import evaluation_options
from mcibi_jax.porting.convert import PortError
from mcibi_jax.porting.pth import PthError
from mcibi_jax.predict import (
    CONFIG_HELP,
    WEIGHT_FLAGS,
    blend,
    check_config,
    colorize,
    define_weight_flags,
    label_image,
    load_segmenter,
    overlay_background,
    read_rgb,
    warn_without_tta,
)
from mcibi_jax.pretrained import PretrainedError

FORMATS = ("json", "labels", "mask", "overlay")
DEFAULT_MAX_MB = 20.0
DEFAULT_MAX_PIXELS = 4096 * 4096
# an oversized body up to this is read and dropped, so the client sees the 413
_DRAIN_LIMIT = 256 << 20


class BadUpload(ValueError):
    """An upload the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8/uint16 (H, W) or uint8 (H, W, 3|4) array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _hex(colour: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in colour)


class SegmentationService:
    """What the HTTP handler calls: decodes uploads, segments them with ``segmenter`` (one image
    at a time) and renders the label, mask and overlay images."""

    def __init__(
        self,
        segmenter: Any,
        *,
        name: str = "",
        use_tta: bool | None = None,
        background: str = "auto",
        max_bytes: int = int(DEFAULT_MAX_MB * 1e6),
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        config = segmenter.config
        self.segmenter, self.use_tta = segmenter, use_tta
        self.name = name or str(config.get("name", "") or "model")
        self.num_classes = int(config["model"]["num_classes"])
        dataset = config.get("dataset")
        self.palette = dataset_palette(dataset, self.num_classes)
        self.class_names = class_names(dataset, self.num_classes)
        self.background = overlay_background(background, dataset, self.num_classes)
        self.max_bytes, self.max_pixels = int(max_bytes), int(max_pixels)
        # one image at a time: bounded memory, no duplicate compilations
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        classes = [
            {"id": k, "name": n, "colour": _hex(c)}
            for k, (n, c) in enumerate(zip(self.class_names, self.palette))
        ]
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "classes": classes,
            "background": self.background,
            "max_bytes": self.max_bytes,
            "max_pixels": self.max_pixels,
        }

    def check_size(self, num_bytes: int) -> None:
        if num_bytes > self.max_bytes:
            raise BadUpload(
                f"the upload is too large: {num_bytes / 1e6:.1f} MB, at most {self.max_bytes / 1e6:.1f} MB "
                "(--max_mb)",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )

    def decode(self, data: bytes) -> np.ndarray:
        """uint8 (H, W, 3) RGB of an uploaded file, or BadUpload (400 / 413)."""
        if not data:
            raise BadUpload("the upload is empty: send an image file as the request body")
        self.check_size(len(data))
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size  # from the header, before decoding the pixels
        except Exception:  # Pillow raises many types for foreign files
            raise BadUpload(
                "the upload is not an image Pillow can read (try a JPEG or PNG)"
            ) from None
        if width * height > self.max_pixels:
            raise BadUpload(
                f"the image is too large: {width}x{height} = {width * height:,} pixels, at most "
                f"{self.max_pixels:,} (--max_pixels)",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        try:
            return read_rgb(io.BytesIO(data))
        except ValueError as error:
            raise BadUpload(f"the image cannot be decoded: {error}") from None

    def segment(self, image: np.ndarray) -> np.ndarray:
        """int32 (H, W) class ids of a uint8 (H, W, 3) image."""
        with self._lock:
            return self.segmenter.predict(image, use_tta=self.use_tta)

    def mask_rgba(self, labels: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 4): the class colours, the background class transparent."""
        alpha = np.full(labels.shape, 255, np.uint8)
        if self.background is not None:
            alpha[labels == self.background] = 0
        return np.concatenate([colorize(labels, self.palette), alpha[..., None]], -1)

    def shares(self, labels: np.ndarray) -> list[dict[str, Any]]:
        """The classes present in ``labels``, largest share (of all pixels) first."""
        counts = np.bincount(labels.ravel(), minlength=self.num_classes)
        order = np.argsort(-counts, kind="stable")
        return [
            {
                "id": int(k),
                "name": self.class_names[k],
                "colour": _hex(self.palette[k]),
                "share": float(counts[k] / labels.size),
            }
            for k in order
            if counts[k]
        ]

    def respond(self, data: bytes, fmt: str = "json", alpha: float = 0.5) -> tuple[str, bytes]:
        """(content type, body) of a segmentation request; BadUpload for bad requests."""
        if fmt not in FORMATS:
            raise BadUpload(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if not 0.0 <= alpha <= 1.0:
            raise BadUpload(f"alpha must be within 0..1, got {alpha}")
        image = self.decode(data)
        started = time.perf_counter()
        labels = self.segment(image)
        seconds = time.perf_counter() - started
        if fmt == "labels":
            return "image/png", encode_png(label_image(labels, self.num_classes))
        if fmt == "mask":
            return "image/png", encode_png(self.mask_rgba(labels))
        if fmt == "overlay":
            keep = None if self.background is None else labels == self.background
            return "image/png", encode_png(
                blend(image, colorize(labels, self.palette), alpha, keep)
            )
        body = {
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "seconds": round(seconds, 3),
            "classes": self.shares(labels),
            "background": self.background,
            "labels_png": base64.b64encode(
                encode_png(label_image(labels, self.num_classes))
            ).decode("ascii"),
            "mask_png": base64.b64encode(encode_png(self.mask_rgba(labels))).decode("ascii"),
        }
        return "application/json", json.dumps(body).encode()


def page() -> bytes:
    """The HTML of the page (mcibi_jax/serve_page.html)."""
    return resources.files("mcibi_jax").joinpath("serve_page.html").read_bytes()


def make_handler(service: SegmentationService, quiet: bool = False) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "mcibi_jax"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            if not quiet:
                super().log_message(format, *args)

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, "application/json", json.dumps({"error": message}).encode())

        def do_GET(self) -> None:  # noqa: N802 (the base class's name)
            path = urlsplit(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", page())
            elif path == "/api/info":
                self._send(HTTPStatus.OK, "application/json", json.dumps(service.info()).encode())
            elif (
                path == "/favicon.ico"
            ):  # browsers ask for it: nothing, without an error in the log
                self.send_response(HTTPStatus.NO_CONTENT)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._error(
                    HTTPStatus.NOT_FOUND,
                    f"no such page: {path}; the page is at /, the API at /api/info "
                    "and /api/segment",
                )

        do_HEAD = do_GET

        def do_POST(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            if url.path != "/api/segment":
                self._error(
                    HTTPStatus.NOT_FOUND, f"no such endpoint: POST {url.path}; use /api/segment"
                )
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                self._error(HTTPStatus.BAD_REQUEST, "bad Content-Length header")
                return
            try:
                service.check_size(length)
            except BadUpload as error:
                self.close_connection = True
                if length <= _DRAIN_LIMIT:  # read it away, so the client gets to read the answer
                    while length > 0:
                        chunk = self.rfile.read(min(length, 1 << 20))
                        if not chunk:
                            break
                        length -= len(chunk)
                self._error(error.status, str(error))
                return
            data = self.rfile.read(length)
            query = parse_qs(url.query)
            try:
                try:
                    alpha = float(query.get("alpha", ["0.5"])[0])
                except ValueError:
                    raise BadUpload(f"alpha must be a number, got {query['alpha'][0]!r}") from None
                content_type, body = service.respond(data, query.get("format", ["json"])[0], alpha)
            except BadUpload as error:
                self._error(error.status, str(error))
                return
            except (
                Exception
            ) as error:  # the model failed (out of memory, ...): say so, keep serving
                self._error(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    f"segmentation failed: {type(error).__name__}: {error}",
                )
                return
            self._send(HTTPStatus.OK, content_type, body)

    return Handler


def bind(host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer listening on ``host:port`` (``port=0``: any free port) that answers
    nothing until its ``RequestHandlerClass`` is set (:func:`make_handler`) and it serves;
    ConfigError naming ``host:port`` where it cannot listen there."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be within 0..65535 (0: any free port), got {port}")
    try:
        server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    except OSError as error:  # taken, not this machine's address, unknown host name, ...
        raise ConfigError(
            f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port "
            "(0: any free one) or --host"
        ) from None
    server.daemon_threads = True
    return server


def make_server(
    service: SegmentationService, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False
) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer for ``service`` (``port=0``: any free port, see ``server_address``)."""
    server = bind(host, port)
    server.RequestHandlerClass = make_handler(service, quiet)
    return server


def load_service(command: CommandLine) -> SegmentationService:
    """The one place the parsed command line turns its weight flags into a model."""
    fv, config = command.flags, check_config(command.config)
    evaluation_options(config, True if fv.tta else None)  # checked before the weights load
    warn_without_tta(config, fv.tta)
    segmenter = load_segmenter(
        config, checkpoint=fv.checkpoint, pth=fv.pth, pretrained=fv.pretrained
    )
    return SegmentationService(
        segmenter,
        use_tta=True if fv.tta else None,
        background=fv.overlay_background,
        max_bytes=int(fv.max_mb * 1e6),
        max_pixels=fv.max_pixels,
    )


def parse_command_line(argv: Sequence[str] | None = None) -> CommandLine:
    """The parsed command line of ``python -m mcibi_jax.serve`` (usage errors exit with 2)."""
    command = CommandLine(
        "python -m mcibi_jax.serve",
        __doc__,
        config=CONFIG_HELP,
    )
    fv = command.flags
    define_weight_flags(fv)
    flags.DEFINE_string(
        "host",
        "127.0.0.1",
        "address to listen on (0.0.0.0: every interface, no authentication)",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "port",
        8000,
        "port to listen on (0: any free one)",
        lower_bound=0,
        upper_bound=65535,
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "tta", False, "use the eval.tta_* settings (multi-scale, flip)", flag_values=fv
    )
    flags.DEFINE_string(
        "overlay_background",
        "auto",
        "class left transparent in the overlay: auto (the dataset's 'background' class), none, "
        "or a class id",
        flag_values=fv,
    )
    flags.DEFINE_float("max_mb", DEFAULT_MAX_MB, "largest upload, in megabytes", flag_values=fv)
    flags.DEFINE_integer(
        "max_pixels", DEFAULT_MAX_PIXELS, "largest image, in pixels", flag_values=fv
    )
    flags.DEFINE_bool("quiet", False, "do not log each request", flag_values=fv)
    command.parse(argv, pretrained_config=True)
    command.one_of(WEIGHT_FLAGS)
    return command


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM stop the server, also where its parent started it with them
    ignored or blocked (a background job of a shell script; under some test runners Ctrl-C was
    silently ignored)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _interrupt)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def main(argv: Sequence[str] | None = None) -> int:
    command = parse_command_line(argv)
    fv = command.flags
    compilation_cache.enable()
    server = None
    try:
        if fv.max_mb <= 0 or fv.max_pixels <= 0:
            raise ConfigError("--max_mb and --max_pixels must be positive")
        server = bind(fv.host, fv.port)  # before the model loads: a taken port fails at once
        service = load_service(command)
    except (ConfigError, PthError, PortError, PretrainedError, OSError) as error:
        # OSError: missing files
        if server is not None:
            server.server_close()
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    server.RequestHandlerClass = make_handler(service, fv.quiet)
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    print(
        f"serving {service.name} ({service.num_classes} classes) on http://{shown}:{port}/ "
        f"(POST images to /api/segment); Ctrl-C or SIGTERM stops",
        flush=True,
    )
    stop_on_signals()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

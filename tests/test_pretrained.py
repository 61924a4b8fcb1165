"""Released checkpoints by name (``mcibi_jax.pretrained``): download into the cache (resumed,
checked, recorded), port once, and the commands that take ``--pretrained``; all against a
local HTTP server serving a small generated checkpoint."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

import mcibi_jax
from mcibi_jax import pretrained
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.porting.convert import variables_to_state_dict
from mcibi_jax.porting.pth import save_state_dict
from mcibi_jax.porting.variables import abstract_variables

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.py"
NAME = "tiny:r18"
FILE = "deeplabv3_tiny.pth"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` with Range support; ``cut_after`` (bytes) drops the next transfer early."""

    files: dict[str, bytes] = {}
    cut_after: int | None = None
    requests: list[dict] = []

    def log_message(self, *args):  # quiet
        pass

    @staticmethod
    def etag(data: bytes) -> str:
        return f'"{hashlib.sha1(data).hexdigest()[:16]}"'

    def do_GET(self):
        type(self).requests.append({"path": self.path, "range": self.headers.get("Range")})
        data = self.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        if start and self.headers.get("If-Range") not in (
            None,
            self.etag(data),
        ):  # changed since: send it all
            start = 0
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("ETag", self.etag(data))
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, type(self).cut_after = type(self).cut_after, None
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def tiny_config():
    return mcibi_jax.load_config(DEMO)


@pytest.fixture(scope="module")
def tiny_pth(tiny_config, tmp_path_factory) -> bytes:
    """A checkpoint of the demo model with random weights (positive variances), in the released layout."""
    rng = np.random.default_rng(3)
    shapes = abstract_variables(build_model(tiny_config["model"]), tiny_config["model"])
    variables = {
        collection: jax.tree_util.tree_map(
            lambda leaf, collection=collection: (
                0.5 + rng.random(leaf.shape)
                if collection == "batch_stats"
                else 0.2 * rng.standard_normal(leaf.shape)
            ).astype(np.float32),
            dict(tree),
        )
        for collection, tree in shapes.items()
    }
    path = tmp_path_factory.mktemp("pth") / FILE
    save_state_dict(variables_to_state_dict(variables), path)
    return path.read_bytes()


@pytest.fixture()
def server(tiny_pth):
    _Handler.files = {FILE: tiny_pth}
    _Handler.cut_after = None
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", _Handler
    httpd.shutdown()
    httpd.server_close()


class _DemoRelease(pretrained.Release):
    """A release whose recipe is configs/demo.py (it takes no argument)."""

    def config_spec(self) -> str:
        return str(DEMO)


@pytest.fixture()
def release(tiny_config, server, tmp_path, monkeypatch):
    """``tiny:r18`` in the registry (the demo model), served by ``server``, cached in tmp_path."""
    url, _ = server
    monkeypatch.setenv(pretrained.URL_ENV, url)
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    entry = _DemoRelease(NAME, FILE, 50.0, 51.0)
    monkeypatch.setitem(pretrained.RELEASES, NAME, entry)
    return entry


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_18_released_checkpoints():
    names = [n for n in pretrained.RELEASES]
    assert len(names) == 18 and names[0] == "cityscapes:r50" and names[-1] == "lip:hrnet48"
    assert "cityscapes:vitl" not in names and "lip:vitl" not in names
    assert pretrained.get("ade20k:r50").url() == (
        "https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_memorynet/deeplabv3_r50_ade20k.pth"
    )
    assert (
        pretrained.get("pretrained:cocostuff10k:vitl").file == "deeplabv3_vitlarge_cocostuff10k.pth"
    )
    assert pretrained.get("lip:hrnet48").file == "deeplabv3_hrnetv2w48_lip.pth"
    assert (pretrained.get("ade20k:r50").miou, pretrained.get("ade20k:r50").miou_tta) == (
        44.39,
        45.97,
    )
    assert pretrained.get("cityscapes:r50").miou is None
    with pytest.raises(mcibi_jax.ConfigError, match="ade20k:r50"):
        pretrained.get("ade20k:r18")


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(pretrained.CACHE_ENV, raising=False)
    assert pretrained.cache_dir() == Path.home() / ".cache" / "mcibi_jax"
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert pretrained.cached_file("lip:r50") == tmp_path / "elsewhere" / "deeplabv3_r50_lip.pth"


def test_download_records_then_reuses(release, server, tiny_pth, capsys):
    _, handler = server
    file = pretrained.download(NAME)
    assert file.read_bytes() == tiny_pth and not file.with_name(FILE + ".part").exists()
    record = json.loads(file.with_name(FILE + ".json").read_text())
    assert record["size"] == len(tiny_pth) and len(record["sha256"]) == 64
    assert pretrained.download(NAME) == file and len(handler.requests) == 1  # no second transfer


def test_interrupted_download_resumes(release, server, tiny_pth):
    _, handler = server
    handler.cut_after = len(tiny_pth) // 3
    with pytest.raises(pretrained.PretrainedError, match="run again to resume") as error:
        pretrained.download(NAME)
    assert "\n" not in str(error.value)
    part = pretrained.cached_file(NAME).with_name(FILE + ".part")
    assert part.stat().st_size == len(tiny_pth) // 3
    file = pretrained.download(NAME)
    assert handler.requests[-1]["range"] == f"bytes={len(tiny_pth) // 3}-"
    assert file.read_bytes() == tiny_pth


def test_a_file_changed_on_the_server_during_an_interruption_comes_whole(release, server, tiny_pth):
    _, handler = server
    handler.cut_after = len(tiny_pth) // 2
    with pytest.raises(pretrained.PretrainedError, match="resume"):
        pretrained.download(NAME)
    changed = tiny_pth[:100] + bytes(255 - b for b in tiny_pth[100:200]) + tiny_pth[200:]
    handler.files = {FILE: changed}
    assert pretrained.download(NAME).read_bytes() == changed  # not half of each
    assert handler.requests[-1]["range"] is not None


def test_wrong_size_against_the_record(release, server, tiny_pth):
    _, handler = server
    pretrained.download(NAME)
    file = pretrained.cached_file(NAME)
    file.unlink()
    handler.files = {FILE: tiny_pth + b"extra"}  # the mirror now serves another file
    with pytest.raises(pretrained.PretrainedError, match="recorded with"):
        pretrained.download(NAME)
    handler.files = {FILE: tiny_pth}
    file.write_bytes(tiny_pth[:-1])  # a truncated file in the cache
    with pytest.raises(pretrained.PretrainedError, match="delete it to download it again"):
        pretrained.download(NAME)


def test_corrupted_file_fails_its_sha256(release, server, tiny_pth):
    file = pretrained.download(NAME)
    damaged = bytearray(tiny_pth)
    damaged[len(damaged) // 2] ^= 0xFF
    file.write_bytes(bytes(damaged))
    with pytest.raises(pretrained.PretrainedError, match="sha256") as error:
        pretrained.checkpoint(NAME)
    assert str(file) in str(error.value)
    file.unlink()  # as the message says: delete it, and the next call downloads a good copy
    assert pretrained.download(NAME).read_bytes() == tiny_pth


def test_offline_or_bad_url_says_where_to_put_the_file(release, monkeypatch, capsys):
    monkeypatch.setenv(pretrained.URL_ENV, f"http://127.0.0.1:{_closed_port()}/")
    target = pretrained.cached_file(NAME)
    with pytest.raises(pretrained.PretrainedError) as error:
        pretrained.download(NAME)
    message = str(error.value)
    assert "\n" not in message and f"put it at {target}" in message
    monkeypatch.setenv(pretrained.URL_ENV, "http://127.0.0.1:1/does-not-exist/")
    code = pretrained.main([NAME])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot download tiny:r18") and str(target) in err


def test_missing_file_on_the_server(release, server):
    _, handler = server
    handler.files = {}
    with pytest.raises(pretrained.PretrainedError, match="HTTP 404") as error:
        pretrained.download(NAME)
    assert f"put it at {pretrained.cached_file(NAME)}" in str(error.value)
    assert not pretrained.cached_file(NAME).with_name(FILE + ".part").exists()


def test_the_table(release, server, capsys):
    assert pretrained.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 19 + 1 and lines[1].split()[:3] == ["cityscapes:r50", "-", "79.97"]
    assert lines[-2].split() == [NAME, "50.00", "51.00", "-"]
    pretrained.download(NAME, log=lambda message: None)
    assert pretrained.main([]) == 0
    assert capsys.readouterr().out.splitlines()[-2].split()[-1] == "downloaded"


def test_a_file_put_by_hand_is_recorded_and_ported(release, tiny_pth, monkeypatch):
    monkeypatch.setenv(pretrained.URL_ENV, f"http://127.0.0.1:{_closed_port()}/")
    target = pretrained.cached_file(NAME)
    target.parent.mkdir(parents=True)
    target.write_bytes(tiny_pth)
    ported = pretrained.checkpoint(NAME, log=lambda message: None)
    assert ported.is_dir() and json.loads(target.with_name(FILE + ".json").read_text())[
        "size"
    ] == len(tiny_pth)


def test_port_once_and_from_pretrained(release, server, tiny_config, tiny_pth, tmp_path):
    _, handler = server
    seg = mcibi_jax.Segmenter.from_pretrained(NAME)
    ported = pretrained.cached_file(NAME).with_suffix(".orbax")
    assert ported.is_dir()
    stamp = ported.stat().st_mtime_ns
    again = mcibi_jax.Segmenter.from_pretrained(NAME)
    assert ported.stat().st_mtime_ns == stamp and len(handler.requests) == 1
    direct = mcibi_jax.Segmenter.from_pth(pretrained.cached_file(NAME), tiny_config)
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    np.testing.assert_array_equal(seg.predict(image), direct.predict(image))
    np.testing.assert_array_equal(again.predict(image), direct.predict(image))


def test_commands_take_a_pretrained_name(release, server, tiny_config, tmp_path, capsys):
    from PIL import Image

    from mcibi_jax import port, predict
    from mcibi_jax.porting.variables import load_variables
    from mcibi_jax.train.experiment import initial_variables

    _, handler = server
    out = tmp_path / "ported"
    assert port.main([f"--pretrained={NAME}", f"--out={out}"]) == 0
    assert "ported" in capsys.readouterr().out
    ported = load_variables(out, tiny_config)

    photos = tmp_path / "photos"
    photos.mkdir()
    image = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(photos / "a.png")
    assert (
        predict.main(
            [f"--pretrained={NAME}", f"--input={photos}", f"--output={tmp_path / 'masks'}"]
        )
        == 0
    )
    labels = np.asarray(Image.open(tmp_path / "masks" / "a_labels.png"))
    np.testing.assert_array_equal(
        labels, mcibi_jax.Segmenter.from_config(tiny_config, ported).predict(image)
    )

    config = mcibi_jax.load_config(DEMO, [f"train.init_from='pretrained:{NAME}'"])
    lines = []
    initial = initial_variables(config, lines.append)
    assert lines[-1] == f"initialised from pretrained:{NAME}"
    for x, y in zip(jax.tree_util.tree_leaves(initial), jax.tree_util.tree_leaves(ported)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert len(handler.requests) == 1  # one download served all three commands

    bad = mcibi_jax.load_config(DEMO, ["train.init_from='pretrained:ade20k:r18'"])
    with pytest.raises(mcibi_jax.ConfigError, match="no released checkpoint"):
        initial_variables(bad, lines.append)
    assert (
        predict.main(
            [
                f"--input={photos}",
                f"--output={tmp_path / 'x'}",
                f"--pretrained={NAME}",
                "--config.model.num_classes=5",
            ]
        )
        == 2
    )
    assert "does not match" in capsys.readouterr().err

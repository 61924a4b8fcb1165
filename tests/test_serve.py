"""``python -m mcibi_jax.serve``: the HTTP endpoint (urllib) and the page in a headless browser."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import mcibi_jax
from mcibi_jax import predict, serve
from mcibi_jax.porting.variables import save_variables
from mcibi_jax.train.state import init_variables

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.py"
BROWSER_INSTALL = 'apt-get install -y chromium chromium-driver && pip install -e ".[browser]"'
MAX_BYTES, MAX_PIXELS = 200_000, 400 * 400


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Colour blobs: the untrained demo model then predicts several classes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def segmenter():
    from mcibi_jax.models.segmentor import build_model

    config = mcibi_jax.load_config(DEMO)
    model = build_model(config.model)
    variables = init_variables(model, jax.random.key(3, impl="rbg"), (32, 32))
    return mcibi_jax.Segmenter(model, variables, config)


@pytest.fixture(scope="module")
def server(segmenter):
    service = serve.SegmentationService(segmenter, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    httpd = serve.make_server(service, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", service
    httpd.shutdown()
    httpd.server_close()


def _request(url: str, data: bytes | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def test_endpoint_segments_and_renders(server, segmenter):
    url, service = server
    image = _image(40, 56)
    status, kind, body = _request(f"{url}/api/segment", _png(image))
    assert status == 200 and kind == "application/json"
    result = json.loads(body)
    labels = segmenter.predict(image)
    assert (result["width"], result["height"]) == (56, 40) and result["background"] == 0
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["labels_png"]))))
    np.testing.assert_array_equal(decoded, labels)
    shares = {c["name"]: c["share"] for c in result["classes"]}
    counts = np.bincount(labels.ravel(), minlength=4) / labels.size
    assert shares == {
        name: pytest.approx(counts[k]) for k, name in enumerate(service.class_names) if counts[k]
    }
    assert [c["share"] for c in result["classes"]] == sorted(shares.values(), reverse=True)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask_png"]))))
    assert mask.shape == (40, 56, 4)
    np.testing.assert_array_equal(mask[..., :3], service.palette[labels])
    # the background class is transparent
    np.testing.assert_array_equal(mask[..., 3] == 0, labels == 0)

    status, kind, body = _request(f"{url}/api/segment?format=labels", _png(image))
    assert status == 200 and kind == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), labels)
    status, _, body = _request(f"{url}/api/segment?format=overlay&alpha=0.7", _png(image))
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(body))),
        predict.overlay(image, labels, service.palette, 0.7, background=0),
    )

    status, kind, body = _request(f"{url}/api/info")
    info = json.loads(body)
    assert status == 200 and info["num_classes"] == 4 and info["background"] == 0
    assert [c["name"] for c in info["classes"]] == ["background", "shape1", "shape2", "shape3"]
    status, kind, body = _request(f"{url}/")
    assert status == 200 and kind.startswith("text/html") and b"opacity" in body


def test_bad_uploads_get_a_clear_message(server):
    url, _ = server
    cases = [
        ("/api/segment", b"this is not an image", 400, "not an image"),
        ("/api/segment", b"", 400, "empty"),
        # about 270 kB of noise, above the 200 kB limit
        (
            "/api/segment",
            _png(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)),
            413,
            "too large",
        ),
        ("/api/segment", _png(np.zeros((401, 400, 3), np.uint8)), 413, "160,400 pixels"),
        ("/api/segment?format=gif", _png(_image(8, 8)), 400, "unknown format"),
        ("/api/segment?format=overlay&alpha=x", _png(_image(8, 8)), 400, "alpha"),
        ("/api/nothing", b"x", 404, "/api/segment"),
    ]
    for path, data, code, message in cases:
        status, kind, body = _request(url + path, data)
        assert (status, kind) == (code, "application/json"), (path, body)
        assert message in json.loads(body)["error"], (path, body)
    assert _request(url + "/nothing")[0] == 404
    assert _request(f"{url}/api/segment", _png(_image(8, 8)))[0] == 200  # still serving


def test_command_line_loads_a_checkpoint_and_reports_errors(segmenter, tmp_path, capsys):
    workdir = tmp_path / "run"
    save_variables(workdir / "checkpoints" / "final", segmenter.variables)  # a training workdir
    command = serve.parse_command_line(
        [f"--config={DEMO}", f"--checkpoint={workdir}", "--overlay_background=none"]
    )
    service = serve.load_service(command)
    image = _image(24, 32)
    np.testing.assert_array_equal(service.segment(image), segmenter.predict(image))
    assert service.background is None and service.name == "mcibi_r18_synthetic_demo"

    for argv, message in [
        ([f"--config={DEMO}", f"--checkpoint={tmp_path / 'missing'}"], "no checkpoint at"),
        ([f"--checkpoint={workdir}"], "--config is required"),
        (
            [f"--config={DEMO}", f"--checkpoint={workdir}", "--config.model.nope=1"],
            "unknown config key",
        ),
        (
            [f"--config={DEMO}", f"--checkpoint={workdir}", "--overlay_background=9"],
            "overlay_background",
        ),
        ([f"--config={DEMO}", f"--checkpoint={workdir}", "--max_mb=0"], "--max_mb"),
    ]:
        try:
            code = serve.main(argv)
        except SystemExit as exit_:  # usage errors
            code = exit_.code
        assert code == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err


# Starts `python -m mcibi_jax.serve ARGS` with SIGINT and SIGTERM ignored and blocked, as a
# background job of a script (or a test runner) may pass them on through exec.
SIGNALS_OFF_THEN_SERVE = (
    "import os, signal, sys; stops = {signal.SIGINT, signal.SIGTERM}; "
    "[signal.signal(s, signal.SIG_IGN) for s in stops]; "
    "signal.pthread_sigmask(signal.SIG_BLOCK, stops); "
    "os.execv(sys.executable, [sys.executable, '-m', 'mcibi_jax.serve', *sys.argv[1:]])"
)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_python_m_serve_starts_answers_and_stops(segmenter, tmp_path, stop):
    """Ctrl-C or SIGTERM stops it, even when its parent passed both on ignored and blocked (under
    pytest-xdist, Ctrl-C was once silently ignored: the server kept serving)."""
    import os
    import re
    import signal
    import subprocess
    import sys

    save_variables(tmp_path / "ckpt", segmenter.variables)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SIGNALS_OFF_THEN_SERVE,
            f"--config={DEMO}",
            f"--checkpoint={tmp_path / 'ckpt'}",
            "--port=0",
            "--quiet",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
        assert found, line + process.stderr.read() if process.poll() is not None else line
        status, _, body = _request(found.group(1) + "api/info")
        assert status == 200 and json.loads(body)["name"] == "mcibi_r18_synthetic_demo"
        status, kind, body = _request(
            found.group(1) + "api/segment?format=labels", _png(_image(16, 24))
        )
        assert status == 200 and np.asarray(Image.open(io.BytesIO(body))).shape == (16, 24)
    finally:
        process.send_signal(getattr(signal, stop))
        try:
            out, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)  # faulthandler: where every thread is
            out, err = process.communicate(timeout=60)
            pytest.fail(f"the server did not stop within 120 s of {stop}:\n{out}\n{err[-6000:]}")
    assert process.returncode == 0 and "stopped" in out, err


def _browser():
    """A headless Chromium driven by selenium, or a skip saying how to install them."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"the browser test needs selenium and Chromium: {BROWSER_INSTALL}")
    binary = (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip(f"the browser test needs Chromium and its driver: {BROWSER_INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver_path))


def test_page_in_a_headless_browser(server, segmenter, tmp_path):
    driver = _browser()  # skips without selenium or Chromium, before anything imports selenium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    url, service = server
    image = _image(48, 64, seed=1)
    Image.fromarray(image).save(tmp_path / "photo.png")
    (tmp_path / "notes.png").write_text("not an image at all")
    np.random.seed(0)
    Image.fromarray(np.random.randint(0, 256, (300, 300, 3), dtype=np.uint8)).save(
        tmp_path / "big.png"
    )

    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "4 classes" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "photo.png"))
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))
        wait.until(
            lambda d: d.execute_script(
                "return document.getElementById('mask').complete "
                "&& document.getElementById('mask').naturalWidth > 0"
            )
        )
        # the overlay: the photo with the mask over it, both at the image's size
        assert driver.execute_script(
            "return [document.getElementById('mask').naturalWidth, "
            "document.getElementById('mask').naturalHeight]"
        ) == [64, 48]
        assert (
            driver.find_element(By.ID, "mask").is_displayed()
            and driver.find_element(By.ID, "photo").is_displayed()
        )
        assert driver.find_element(By.ID, "mask").value_of_css_property("opacity") == "0.6"
        driver.execute_script(
            "const s = document.getElementById('opacity'); s.value = 25; "
            "s.dispatchEvent(new Event('input'));"
        )
        assert driver.find_element(By.ID, "mask").value_of_css_property("opacity") == "0.25"
        # the legend: each predicted class with its colour and share
        labels = segmenter.predict(image)
        counts = np.bincount(labels.ravel(), minlength=4)
        items = driver.find_elements(By.CSS_SELECTOR, "#legend li")
        shown = {int(li.get_attribute("data-class-id")): li.text for li in items}
        assert set(shown) == {k for k in range(4) if counts[k]}
        for k, text in shown.items():
            assert (
                service.class_names[k] in text and f"{100 * counts[k] / labels.size:.1f} %" in text
            )
        swatch = (
            items[0].find_element(By.CLASS_NAME, "swatch").value_of_css_property("background-color")
        )
        first = int(items[0].get_attribute("data-class-id"))
        assert swatch.replace(" ", "").startswith("rgb") and tuple(
            int(v) for v in swatch[swatch.index("(") + 1 :].rstrip(")").split(",")[:3]
        ) == tuple(service.palette[first])
        # the download link holds the label PNG
        link = driver.find_element(By.ID, "download")
        assert link.get_attribute("download") == "photo_labels.png"
        href = link.get_attribute("href")
        assert href.startswith("data:image/png;base64,")
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))), labels
        )
        assert driver.find_element(By.ID, "error").text == ""

        # bad uploads: the server's message on the page
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.png"))
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert (
            "400" in driver.find_element(By.ID, "error").text
            and "not an image" in driver.find_element(By.ID, "error").text
        )
        assert not driver.find_element(By.ID, "result").is_displayed()
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "big.png"))
        wait.until(lambda d: "413" in d.find_element(By.ID, "error").text)
        assert "too large" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()

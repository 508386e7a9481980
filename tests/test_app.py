"""``pva app``: the web app's logic, and the page driven in a real headless browser."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import FACES, REPO
from PIL import Image

from pva.app import PVAApp, UserError, find_adapter
from pva.cli import main

PERSON = FACES / "deepface/id01_img1"
REFS = [str(p) for p in sorted(PERSON.iterdir())[1:4]]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("PVA_ARTIFACTS", REPO / ".artifacts"))
"""Where the browser test keeps its screenshot (ignored by git)."""


def _photo(tmp: Path) -> tuple[Path, np.ndarray]:
    """The target photo as a PNG (lossless in the browser too), downscaled for speed."""
    with Image.open(PERSON / "img1.jpg") as im:
        im = im.convert("RGB")
        im.thumbnail((480, 640))
        path = tmp / "photo.png"
        im.save(path)
    return path, np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def app(quick_demo, tmp_path_factory):
    demo_out, _ = quick_demo
    return PVAApp(find_adapter(None, str(demo_out)), out=tmp_path_factory.mktemp("app") / "out")


def test_generate_writes_outputs_and_keeps_the_outside(app, tmp_path):
    path, photo = _photo(tmp_path)
    gallery, files = app.generate(
        {"background": photo, "layers": []}, "lowerface", REFS, "", steps=3, num_images=2
    )
    assert [label for _, label in gallery] == ["masked input", "output 1", "output 2"]
    assert len(files) == 2 and all(Path(f).parent == app.out / "outputs" for f in files)
    masked = np.asarray(gallery[0][0])
    mask = (masked != photo).any(-1)  # the red tint marks the mask
    out = np.asarray(Image.open(files[0]).convert("RGB"))
    assert out.shape == photo.shape
    assert np.array_equal(out[~mask], photo[~mask])
    assert (out != photo).any(-1)[mask].mean() > 0.5
    again = app.generate({"background": photo, "layers": []}, "lowerface", REFS, "", steps=3)[1]
    assert again[0] not in files  # a new name, nothing overwritten


def test_bad_input_gets_a_message_in_words(app, tmp_path):
    _, photo = _photo(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    blank = np.zeros_like(photo)
    cases = [
        (None, "lowerface", REFS, "upload a photo first"),
        ({"background": photo, "layers": []}, "brush", REFS, "the mask is empty"),
        ({"background": photo, "layers": []}, "lowerface", [], "add 1-10 reference photos"),
        ({"background": photo, "layers": []}, "lowerface", REFS * 4, "at most 10"),
        ({"background": photo}, "lowerface", [str(broken)], "broken.jpg"),
        ({"background": blank}, "lowerface", REFS, "no face detected in the input image"),
        ({"background": photo}, "nose", REFS, "mask must be one of brush, lowerface"),
    ]
    for editor, region, refs, message in cases:
        with pytest.raises(ValueError, match=message):
            app.generate(editor, region, refs, "", steps=2)
    with pytest.raises(ValueError, match="steps"):
        app.generate({"background": photo}, "lowerface", REFS, "", steps=0)
    with pytest.raises(UserError, match="at least 2 photos"):
        app.personalize(REFS[:1], "x", steps=1)


def test_personalize_adds_an_adapter_that_generates(app, tmp_path):
    _, photo = _photo(tmp_path)
    made = app.personalize(REFS, "my person!", steps=2)
    assert Path(made).name == "my-person.safetensors"
    assert made in app.adapters() and ("my-person", made) in app.adapter_choices()
    with pytest.raises(UserError, match="exists"):
        app.personalize(REFS, "my person", steps=2)
    base = app.generate({"background": photo}, "lowerface", REFS, "", steps=2)[1][0]
    personal = app.generate({"background": photo}, "lowerface", REFS, "", steps=2, adapter=made)
    a, b = np.asarray(Image.open(base)), np.asarray(Image.open(personal[1][0]))
    assert not np.array_equal(a, b)  # the fine-tuned weights are the ones used
    again = app.generate({"background": photo}, "lowerface", REFS, "", steps=2)[1][0]
    assert np.array_equal(np.asarray(Image.open(again)), a)  # back to the base, exactly


def test_pva_app_without_a_demo_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["app"]) == 2
    err = capsys.readouterr().err
    assert "run `pva demo` first" in err and "demo_out/adapter.safetensors" in err
    with pytest.raises(SystemExit):
        main(["app", "--port", "70000"])
    assert "--port: must be an integer in [0, 65535]" in capsys.readouterr().err


# ------------------------------------------------------------------------ the real browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(quick_demo):
    """``pva app`` with no arguments but a port, in the folder where ``pva demo`` ran."""
    demo_out, _ = quick_demo
    port = _free_port()
    cmd = [sys.executable, "-m", "pva.cli", "app", "--port", str(port)]
    log = open(demo_out.parent / "app.log", "w")  # noqa: SIM115 - open while the app runs
    proc = subprocess.Popen(cmd, cwd=demo_out.parent, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                text = (demo_out.parent / "app.log").read_text()[-3000:]
                raise AssertionError(f"pva app did not start:\n{text}") from None
            time.sleep(0.5)
    yield url, demo_out.parent
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    assert not missing, f"{missing} missing: apt-get install -y chromium chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1400,1700")
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _toasts(driver) -> str:
    from selenium.webdriver.common.by import By

    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "[class*=toast]"))


def test_the_page_in_a_real_browser(served, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, cwd = served
    path, photo = _photo(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    d, wait = browser, WebDriverWait(browser, 240)
    d.get(url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    d.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(path))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo canvas"))
    time.sleep(1)  # the editor lays the photo out

    # paint a stroke with the brush, across the middle of the photo
    d.find_element(By.CSS_SELECTOR, "#photo button[aria-label='Brush']").click()
    canvas = d.find_element(By.CSS_SELECTOR, "#photo canvas")
    strokes = ActionChains(d).move_to_element_with_offset(canvas, -30, 10).click_and_hold()
    for dx in range(-30, 31, 6):
        strokes = strokes.move_to_element_with_offset(canvas, dx, 10)
    strokes.release().perform()

    steps = d.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
    steps.clear()
    steps.send_keys("10\t")

    # a reference that is not an image: a message in the page, and the app keeps serving
    refs = d.find_element(By.CSS_SELECTOR, "#refs input[type=file]")
    refs.send_keys(str(broken))
    time.sleep(1)
    d.find_element(By.ID, "generate").click()
    wait.until(lambda d: "broken.jpg" in _toasts(d))
    assert "unreadable image" in _toasts(d)
    assert "Traceback" not in d.page_source
    d.find_element(By.CSS_SELECTOR, "#refs button[aria-label='Clear']").click()
    time.sleep(1)
    d.find_element(By.CSS_SELECTOR, "#refs input[type=file]").send_keys("\n".join(REFS))
    time.sleep(2)

    d.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#downloads a[href]"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "app_browser_test.png"))

    def fetch(src: str) -> np.ndarray:
        with urllib.request.urlopen(src, timeout=30) as r:
            return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))

    shown = [
        fetch(i.get_attribute("src")) for i in d.find_elements(By.CSS_SELECTOR, "#gallery img")
    ]
    masked, out = shown[0], shown[1]
    assert masked.shape == out.shape == photo.shape
    mask = (masked != photo).any(-1)  # the red tint: the painted stroke
    assert 50 < mask.sum() < 0.5 * mask.size
    assert np.array_equal(out[~mask], photo[~mask])  # outside the mask: exactly the input
    assert (out != photo).any(-1)[mask].mean() > 0.5  # inside: the model's pixels
    download = fetch(d.find_element(By.CSS_SELECTOR, "#downloads a[href]").get_attribute("href"))
    assert np.array_equal(download, out)
    assert list((cwd / "app_out" / "outputs").glob("*.png"))

    # nothing was fetched from outside this machine
    hosts = set()
    for entry in d.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            parts = urllib.parse.urlsplit(message["params"]["request"]["url"])
            if parts.scheme in ("http", "https", "ws", "wss"):
                hosts.add(parts.hostname)
    assert hosts == {"127.0.0.1"}

"""Make ``docs/app.png``, the README's picture of ``pva app``, from a ``pva demo`` run.

Run from the clone after ``pva demo`` (or ``pva demo --quick``)::

    python docs/app_screenshot.py --demo-out demo_out

It serves ``pva app`` on the demo's stand-in models, opens it in headless Chromium (Debian's
``chromium`` and ``chromium-driver``), gives it a test person of the demo (one photo to fill,
the others as references), picks the lowerface mask, generates, and saves the page. The demo's
persons are procedural, so no real person's photo ends up in the repository.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image


def main() -> None:
    """Serve, drive and photograph the app (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-out", default="demo_out", help="the pva demo folder")
    parser.add_argument("--out", default="docs/app.png", help="the screenshot to write")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps in the page")
    args = parser.parse_args()
    demo = Path(args.demo_out)
    ann = json.loads((demo / "data" / "annotation" / "idi-5.json").read_text())
    person = ann["test_ids"][0]
    files = ann["id2image"][person]  # {"infer": [...], "ref": [...]}
    photos = [demo / "data" / "image" / f for f in files["infer"][:1] + files["ref"]]
    tmp = Path(tempfile.mkdtemp())
    shown = []
    for p in photos:  # 128 px procedural photos, enlarged so the page shows them
        with Image.open(p) as im:
            im.convert("RGB").resize((384, 384), Image.LANCZOS).save(tmp / f"{p.stem}.png")
        shown.append(str(tmp / f"{p.stem}.png"))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pva.cli", "app", "--demo-out", str(demo), "--port", str(port)]
    cmd += ["--out", str(tmp / "app_out")]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(360):
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        _drive(url, shown[0], shown[1:], args.steps, Path(args.out))
    finally:
        server.terminate()
    print(f"wrote {args.out}")


def _drive(url: str, photo: str, refs: list[str], steps: int, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1280,1250")
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        wait = WebDriverWait(d, 300)
        d.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
        d.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(photo)
        d.find_element(By.CSS_SELECTOR, "#refs input[type=file]").send_keys("\n".join(refs))
        d.find_element(By.XPATH, "//*[@id='region']//label[normalize-space(.)='lowerface']").click()
        box = d.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
        box.clear()
        box.send_keys(f"{steps}\t")
        time.sleep(2)
        d.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
        d.execute_script("window.scrollTo(0, 0)")
        time.sleep(1)
        out.parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(out))
    finally:
        d.quit()


if __name__ == "__main__":
    main()

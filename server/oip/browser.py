"""Headless Chromium for the page at ``/``: the browser test and the README screenshot use the same driver.

    python -m server.oip.browser --url http://127.0.0.1:8000 --image sample.png --out docs/oip-page.png

opens the page of a running g2g-serve, waits for the sparse-vs-dense measurement from /stats, uploads
``--image``, waits for the top-k bars and saves a screenshot. Needs the Debian packages ``chromium``
and ``chromium-driver`` and the Python package ``selenium`` (a test dependency).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from server.loadtest import loopback_only

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")


def chromium_paths() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) from PATH; None where missing."""
    return shutil.which("chromium"), shutil.which("chromedriver")


def headless_chromium(profile_dir: Path, width: int = 900, height: int = 900):
    """A selenium driver for the system Chromium with a fresh profile in ``profile_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = chromium_paths()
    if not (chromium and chromedriver):
        raise RuntimeError("needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(chromedriver))


def open_page(driver, url: str, timeout: float = 30.0) -> None:
    """Open the page and wait until it lists the served models."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url.rstrip("/") + "/")
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))


def classify_on_page(driver, image: Path, timeout: float = 30.0) -> str:
    """Upload ``image`` on the open page and wait for the result; returns the rendered top-1 label."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    driver.find_element(By.ID, "file").send_keys(str(Path(image).resolve()))
    wait.until(lambda d: d.find_element(By.ID, "top1").text or d.find_element(By.ID, "error").text)
    return driver.find_element(By.ID, "top1").text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.oip.browser", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="a running g2g-serve on this machine")
    p.add_argument("--image", type=Path, required=True, help="the image to upload (e.g. python -m server.sample)")
    p.add_argument("--out", type=Path, required=True, help="the screenshot (PNG)")
    p.add_argument("--stats-timeout", type=float, default=120.0, help="seconds to wait for /stats' measurement")
    args = p.parse_args(argv)
    loopback_only(args.url)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory(prefix="g2g-chromium-") as profile:
        driver = headless_chromium(Path(profile), 820, 960)
        try:
            open_page(driver, args.url)
            WebDriverWait(driver, args.stats_timeout).until(  # the start-up measurement, then a quiet request
                lambda d: "measuring" not in d.find_element(By.ID, "savings").text)
            classify_on_page(driver, args.image)  # the first request also warms the decode pool: shown is the second
            driver.execute_script("document.getElementById('top1').textContent = ''")
            label = classify_on_page(driver, args.image)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_bytes(driver.get_screenshot_as_png())
            tmp.replace(args.out)  # atomic: never a half-written PNG
        finally:
            driver.quit()
    print(f"wrote {args.out}: top-1 {label!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

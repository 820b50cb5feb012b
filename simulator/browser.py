"""Debian's headless Chromium, driven by Selenium through Debian's chromedriver: how the tests,
the simulator (`--console`'s press-to-row figure) and `make bench` look at the operator console.

Selenium is given both binaries, so its own manager never tries to download a browser. The
console's certificate is accepted by its public key only (`--ignore-certificate-errors-spki-
list`): any other certificate error still fails, as it would for an operator.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver  # a dev dependency: `make sim`/`make test` install it
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

WAIT_S = 20.0


def available() -> str | None:
    """None if a headless Chromium can be driven here, else what is missing."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    return f"{' and '.join(missing)} not installed (make sysdeps)" if missing else None


def spki_hash(cert_file: Path) -> str:
    """The base64 SHA-256 of a certificate's public key, as Chromium's SPKI list wants it."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def chromium(cert_file: Path, profile_dir: Path, *, width: int = 1400,
             height: int = 900, microphone_wav: Path | None = None) -> WebDriver:
    """`microphone_wav`: the browser's microphone plays this WAV in a loop (Chromium's fake
    capture device; the permission prompt is answered yes), for the voice call's tests."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", f"--user-data-dir={profile_dir}",
                "--autoplay-policy=no-user-gesture-required", "--no-first-run",
                "--disable-background-networking",
                f"--ignore-certificate-errors-spki-list={spki_hash(cert_file)}"):
        options.add_argument(arg)
    if microphone_wav is not None:
        for arg in ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                    f"--use-file-for-fake-audio-capture={microphone_wav}"):
            options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(service=service, options=options)


def wait_until(driver: WebDriver, condition: Callable[[WebDriver], Any],
               timeout: float = WAIT_S, what: str = "") -> Any:
    """Selenium's wait (it polls the page: the page is the thing under test, not our code)."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        condition, message=f"timed out after {timeout} s waiting for {what or condition}")


def log_in(driver: WebDriver, base_url: str, username: str, password: str) -> None:
    driver.get(base_url + "login")
    driver.find_element(By.NAME, "username").send_keys(username)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_until(driver, lambda d: d.execute_script(
        "return !!(window.sosConsole && window.sosConsole.ready)"), what="the console to load")


def page_fetch(driver: WebDriver, method: str, path: str, body: Any = None,
               csrf: bool = True) -> dict[str, Any]:
    """A request made by the page itself (its cookie, its origin): {status, body}."""
    return driver.execute_async_script("""
        const [method, path, body, withCsrf, done] = arguments;
        const headers = {"Content-Type": "application/json"};
        if (withCsrf) headers["X-CSRF-Token"] = window.sosConsole.csrf();
        fetch(path, {method, headers, credentials: "same-origin",
                     body: body === null ? undefined : JSON.stringify(body)})
          .then(async r => done({status: r.status, body: await r.json().catch(() => null)}))
          .catch(e => done({status: -1, body: String(e)}));
    """, method, path, body, csrf)


def is_blank(png: bytes) -> bool:
    """A screenshot or frame of one colour only (nothing drawn)."""
    import io

    import av  # PyAV, a project dependency, decodes PNG without another library

    with av.open(io.BytesIO(png), format="png_pipe") as container:
        frame = next(container.decode(video=0)).reformat(format="gray")
    plane = frame.planes[0]
    data = bytes(plane)
    rows = [data[y * plane.line_size:y * plane.line_size + frame.width]
            for y in range(frame.height)]
    return max(map(max, rows)) - min(map(min, rows)) < 8

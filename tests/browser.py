"""Headless Chromium for tests: find or install it once per session, or say why not.

Debian's ``chromium`` and ``chromium-driver`` packages are installed with ``apt-get`` when
they are missing and we are root with apt available; selenium (the ``test`` extra) drives
them. :func:`chromium_or_reason` returns a reason string instead of raising, so that the
caller skips WITH that reason (never silently).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

APT_PACKAGES = ("chromium", "chromium-driver")


def _binaries() -> tuple[str | None, str | None]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    return browser, shutil.which("chromedriver")


def _apt_install() -> str | None:
    """Install the packages; return None on success or why it could not be done."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available to install chromium and chromium-driver"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "chromium/chromium-driver are missing and installing them with apt-get needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *APT_PACKAGES]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"`{' '.join(cmd)}` failed: {err}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return f"`{' '.join(cmd)}` exited {done.returncode}: {' | '.join(tail)}"
    return None


@functools.lru_cache(maxsize=1)  # once per session: apt-get is slow, and its answer does not change
def chromium_or_reason() -> tuple[str, str] | str:
    """``(chromium path, chromedriver path)``, or the reason they cannot be had."""
    import importlib.util

    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    browser, driver = _binaries()
    if browser is None or driver is None:
        reason = _apt_install()
        if reason is not None:
            return reason
        browser, driver = _binaries()
        if browser is None or driver is None:
            return f"apt-get installed {APT_PACKAGES} but chromium/chromedriver are still not on PATH"
    return browser, driver


def start_chromium(browser: str, driver: str, width: int = 1280, height: int = 1000):
    """A headless Chromium WebDriver that records the page's console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def console_errors(driver) -> list[dict]:
    """Console messages at level SEVERE (JavaScript errors, failed loads) since the last call."""
    return [m for m in driver.get_log("browser") if m.get("level") == "SEVERE"]

"""Regenerate docs/results/app/app.png: start `matvlm app` with its defaults, pick a sample scene in headless Chromium,
ask every model, and take the screenshot once every column has answered.

    python experiments/app_screenshot.py [--output docs/results/app/app.png]

Needs the app extra (pip install "matvlm[app]") and Debian's chromium and chromium-driver. Chromium is
driven through chromedriver's W3C WebDriver protocol with the standard library only."""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


class WebDriver:
    """The few W3C WebDriver commands this needs, over chromedriver's HTTP endpoint."""

    def __init__(self, endpoint: str, profile: str, width: int, height: int):
        self.endpoint = endpoint
        options = {"binary": "/usr/bin/chromium",
                   "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]}
        reply = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}})
        self.session = f"/session/{reply['sessionId']}"

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            return json.loads(reply.read())["value"]

    def open(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def run(self, script: str, *args):
        return self._call("POST", f"{self.session}/execute/sync", {"script": script, "args": list(args)})

    def wait_until(self, script: str, seconds: float, *args):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if value := self.run(script, *args):
                return value
            time.sleep(0.25)
        raise TimeoutError(f"the page did not reach this state within {seconds:.0f} s: {script}")

    def screenshot(self) -> bytes:
        return base64.b64decode(self._call("GET", f"{self.session}/screenshot"))

    def quit(self) -> None:
        self._call("DELETE", self.session)


ANSWERED = """
const boxes = [...document.querySelectorAll('[id^="answer-"] textarea')];
const busy = document.querySelector('.eta-bar, .progress-text, .generating');
return boxes.length > 0 && boxes.every(box => box.value.length > 0) && !busy;
"""


def take(output: Path, sample: int, width: int, height: int) -> None:
    app_port, driver_port = free_port(), free_port()
    app = subprocess.Popen([sys.executable, "-m", "matvlm_cli", "app", "--port", str(app_port)])
    driver = subprocess.Popen(["chromedriver", f"--port={driver_port}"], stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{app_port}/"
        wait_for(url, 180)
        wait_for(f"http://127.0.0.1:{driver_port}/status", 30)
        with tempfile.TemporaryDirectory() as profile:
            browser = WebDriver(f"http://127.0.0.1:{driver_port}", profile, width, height)
            try:
                browser.open(url)
                browser.wait_until("return document.querySelectorAll('#samples .thumbnail-item').length", 60)
                browser.run("document.querySelectorAll('#samples .thumbnail-item')[arguments[0]].click()", sample)
                browser.wait_until("return document.querySelector('#component-0, body').innerText.length && "
                                   "document.querySelector('textarea').value.length", 30)
                time.sleep(1)  # the picked image is fetched by the page
                browser.run("document.querySelector('#ask').click()")
                browser.wait_until(ANSWERED, 120)
                time.sleep(1)
                png = browser.screenshot()
            finally:
                browser.quit()
        tmp = output.with_suffix(".tmp.png")
        tmp.write_bytes(png)
        os.replace(tmp, output)
        print(f"wrote {output}")
    finally:
        for process in (driver, app):
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/app/app.png")
    parser.add_argument("--sample", type=int, default=4, help="which sample scene to ask about (0-5)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1120)
    args = parser.parse_args()
    take(args.output, args.sample, args.width, args.height)

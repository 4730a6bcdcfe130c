"""Open a page in headless Chromium through the DevTools protocol and say how it went: console errors and
exceptions, each image's decoded size, and a screenshot. Used by the report tests; needs Debian's ``chromium``
(scripts/setup.sh installs it where it can) and ``websocket-client``."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class DevTools:
    """A minimal DevTools client: send commands, collect events."""

    def __init__(self, url: str) -> None:
        import websocket

        self.socket = websocket.create_connection(url, timeout=60)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(json.loads(self.socket.recv()))
        raise TimeoutError(f"no {method} within {timeout} s")

    def close(self) -> None:
        self.socket.close()


def open_page(path: Path, screenshot: Path, width: int = 1280, height: int = 900) -> dict[str, Any]:
    """Load ``path`` (file://) in headless Chromium; returns {"errors": [...], "images": [{"alt", "width", "height",
    "complete"}], "title": str}, and writes a full-page PNG screenshot to ``screenshot``."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found")
    with tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",  # newer Chromium refuses DevTools websockets from other origins without it
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.is_file() and port_file.read_text().strip()):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("Chromium did not start its DevTools endpoint")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            page = None
            while page is None:  # the first tab may be listed a moment after the endpoint opens
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
                    page = next((t for t in json.loads(response.read()) if t.get("type") == "page"), None)
                if page is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError("Chromium listed no page to drive")
                    time.sleep(0.1)
            tools = DevTools(page["webSocketDebuggerUrl"])
            try:
                for domain in ("Page", "Runtime", "Log"):
                    tools.call(f"{domain}.enable")
                tools.call("Page.navigate", url=path.resolve().as_uri())
                tools.wait_for("Page.loadEventFired")
                check = tools.call(
                    "Runtime.evaluate",
                    expression="JSON.stringify({title: document.title, images: Array.from(document.images).map(i => "
                    "({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight, complete: i.complete}))})",
                    returnByValue=True,
                )
                found = json.loads(check["result"]["value"])
                metrics = tools.call("Page.getLayoutMetrics")
                size = metrics.get("cssContentSize") or metrics["contentSize"]
                shot = tools.call(
                    "Page.captureScreenshot",
                    format="png",
                    captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16000), "scale": 1},
                )
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                errors = []
                for event in tools.events:
                    method, params = event.get("method"), event.get("params", {})
                    if method == "Runtime.exceptionThrown":
                        errors.append(params["exceptionDetails"].get("text", "exception"))
                    elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                        errors.append(str(params.get("args")))
                    elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                        errors.append(params["entry"].get("text", ""))
                found["errors"] = errors
                return found
            finally:
                tools.close()
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()

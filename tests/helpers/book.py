"""Browser checks of the built book: headless Chromium driven over the DevTools protocol.

Chromium is started with ``--remote-debugging-pipe``: DevTools messages travel as
NUL-separated JSON over two pipes (the child's fd 3 and 4), so no websocket library and
no network port are needed. :class:`Chromium` opens a page, waits until its scripts ran,
evaluates JavaScript in it and takes screenshots.

:func:`broken_internal_links` checks every ``href``/``src`` of the built HTML files that
points to a local file.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

#: Flags of a quiet, sandbox-free headless Chromium that never phones home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    # software WebGL (SwiftShader through ANGLE), so that NiiVue's WebGL2 canvas draws
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
)


def find_chromium() -> str | None:
    """Path of Debian's ``chromium`` (or a Chrome) if installed, else None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """A headless Chromium session over the DevTools pipe.

    Use as a context manager; :meth:`open` loads a page in a fresh tab.
    """

    def __init__(self, executable: str, *, width: int = 1280, height: int = 900) -> None:
        self.width, self.height = width, height
        self._profile = tempfile.mkdtemp(prefix="brainage-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_pipes() -> None:  # runs in the child: DevTools reads fd 3, writes fd 4
            # Copy first, so that neither target number is one of the pipes themselves
            # (dup2 onto the same number would keep the close-on-exec flag).
            read_end, write_end = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self._proc = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, "--remote-debugging-pipe",
             f"--user-data-dir={self._profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # close_fds would run after preexec_fn and close fd 3 and 4 again; the other
            # descriptors of this process are non-inheritable and close on exec anyway.
            close_fds=False, preexec_fn=wire_pipes,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    # -- protocol -------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, *, session: str | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        """Send one DevTools command and return its result (raises on a protocol error)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(f"no reply to {method} within {timeout} s")

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe (did it crash?)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for an event of the current session (already received ones count)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method and event.get("sessionId") == self.session:
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.events.append(self._read())

    # -- pages ----------------------------------------------------------------------------
    def open(self, url: str, *, timeout: float = 60.0) -> None:
        """Open ``url`` in a new tab, attach to it and wait for its load event."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Runtime.enable"):
            self.send(domain, session=self.session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1,
                   "mobile": False}, session=self.session)
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=self.session)
        self.wait_event("Page.loadEventFired", timeout=timeout)

    def evaluate(self, expression: str, *, timeout: float = 60.0) -> Any:
        """Evaluate JavaScript (promises are awaited) and return its JSON value."""
        result = self.send("Runtime.evaluate",
                           {"expression": expression, "awaitPromise": True,
                            "returnByValue": True, "timeout": int(timeout * 1000)},
                           session=self.session, timeout=timeout + 5)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def exceptions(self) -> list[str]:
        """Uncaught JavaScript exceptions of the current page so far."""
        return [
            e["params"]["exceptionDetails"].get("exception", {}).get("description", "")
            or e["params"]["exceptionDetails"].get("text", "")
            for e in self.events
            if e.get("method") == "Runtime.exceptionThrown" and e.get("sessionId") == self.session
        ]

    def screenshot(self, path: str | os.PathLike, *, full_page: bool = False,
                   max_height: int = 6000) -> Path:
        """Save a PNG of the viewport (or of the whole page, up to ``max_height`` px)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            height = min(int(self.evaluate("document.documentElement.scrollHeight")), max_height)
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": self.width, "height": height,
                                "scale": 1})
        data = self.send("Page.captureScreenshot", params, session=self.session)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: JavaScript that waits for plotly figures and images, and reports what rendered.
PAGE_REPORT_JS = r"""
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const plots = () => Array.from(document.querySelectorAll('.js-plotly-plot, .plotly-graph-div'));
  for (let i = 0; i < 100; i++) {          // up to 10 s for plotly to draw
    const p = plots();
    if (p.every(d => d.querySelector('svg.main-svg'))) break;
    await sleep(100);
  }
  const images = Array.from(document.images);
  images.forEach(img => { img.loading = 'eager'; });
  await Promise.all(images.map(img => img.complete ? null : new Promise(r => {
    img.addEventListener('load', r); img.addEventListener('error', r); setTimeout(r, 5000);
  })));
  return {
    title: document.title,
    plotly_divs: plots().length,
    plotly_rendered: plots().filter(d => d.querySelector('svg.main-svg')).length,
    main_svgs: document.querySelectorAll('svg.main-svg').length,
    sliders: document.querySelectorAll('g.slider-container').length,
    plotly_loaded: typeof window.Plotly !== 'undefined',
    images: images.map(img => ({src: img.getAttribute('src'), width: img.naturalWidth})),
    text_length: document.body.innerText.length,
  };
})()
"""


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)


def broken_internal_links(html_root: str | os.PathLike) -> list[str]:
    """Return ``"page: link"`` for every local ``href``/``src`` whose file does not exist."""
    html_root = Path(html_root)
    broken = []
    for page in sorted(html_root.rglob("*.html")):
        if page.relative_to(html_root).parts[0] == "_static":
            continue  # the theme's template fragments, not pages
        parser = _LinkParser()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        for link in parser.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("#", "mailto:", "data:",
                                                                  "javascript:")):
                continue
            if not parts.path:
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(html_root)}: {link}")
    return broken

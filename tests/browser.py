"""Render an HTML page in headless Chromium (Debian's ``chromium``, installed by
scripts/install-system-packages.sh) and read back what a reader sees: the DOM after load, whether
every image decoded, and a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

# Set on <body> once the page has loaded: "all" when every <img> decoded to a non-empty bitmap,
# else the alt texts of those that did not.
_MARKER_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-images-loaded', bad.length ? 'missing:' + bad.map(function (i) { return i.alt; }).join(',') : 'all');
});
</script>"""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: run scripts/install-system-packages.sh as root "
                    "(apt-get install -y chromium)")
    return path


def _run(args: list[str], timeout_s: float = 120.0) -> str:
    # --no-sandbox: the tests may run as root (containers), where Chromium's sandbox refuses to start.
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--allow-file-access-from-files", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: str = ""


@dataclass
class Page:
    dom: str
    elements: list[Element] = field(default_factory=list)  # in document order
    body: dict[str, str] = field(default_factory=dict)

    def first(self, tag: str, **attrs: str) -> int:
        """Document-order position of the first ``tag`` with these attributes (-1 if none)."""
        for k, e in enumerate(self.elements):
            if e.tag == tag and all(e.attrs.get(a) == v for a, v in attrs.items()):
                return k
        return -1

    def all(self, tag: str) -> list[Element]:
        return [e for e in self.elements if e.tag == tag]


class _Collect(HTMLParser):
    def __init__(self, page: Page) -> None:
        super().__init__()
        self.page = page
        self.open: list[Element] = []

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.page.elements.append(element)
        if tag == "body":
            self.page.body = element.attrs
        if tag not in ("img", "br", "meta", "link", "input", "hr"):
            self.open.append(element)

    def handle_endtag(self, tag):
        for k in range(len(self.open) - 1, -1, -1):
            if self.open[k].tag == tag:
                del self.open[k:]
                break

    def handle_data(self, data):
        for element in self.open:
            element.text += data


def render(html_path: Path, screenshot: Path | None = None, width: int = 1280, height: int = 4000) -> Page:
    """Load ``html_path`` (a copy with the marker script, beside it so relative links resolve),
    return the DOM after load; with ``screenshot``, also write a PNG of the first ``height`` pixels."""
    html_path = Path(html_path).resolve()
    probe = html_path.with_name(f".probe-{html_path.name}")
    text = html_path.read_text()
    assert "</body>" in text
    probe.write_text(text.replace("</body>", _MARKER_SCRIPT + "</body>", 1))
    try:
        dom = _run(["--virtual-time-budget=15000", "--dump-dom", probe.as_uri()])
        if screenshot is not None:
            _run([f"--screenshot={Path(screenshot).resolve()}", f"--window-size={width},{height}",
                  "--virtual-time-budget=15000", html_path.as_uri()])
    finally:
        probe.unlink()
    page = Page(dom)
    _Collect(page).feed(dom)
    return page

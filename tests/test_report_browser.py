"""report.html in a real headless browser (Debian's chromium): it loads from file:// with nothing fetched from
anywhere else, every figure decodes, the tables are there; a screenshot is kept for a person to look at.

Skipped when no chromium is installed (`apt-get install -y chromium`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from kvsweep.report import build_report
from kvsweep.report.render import CSP
from kvsweep.report.synthetic import write_synthetic

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

SECTIONS = ("summary", "pareto-front", "fronts-per-variant", "overall-perplexity", "memory-at-l-and-break-even-context", "hypervolume",
            "position-wise-perplexity", "learning-curves", "scheduler-and-search", "experiment-history")
CSP_VIOLATION = re.compile(r"Content Security Policy|Refused to (load|connect|apply|execute)", re.I)


def run_chromium(profile: Path, *args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
           "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: nothing could load from a network
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


class Elements(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def of(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


def elements(page: str) -> Elements:
    p = Elements()
    p.feed(page)
    return p


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report of two synthetic sweeps, one still running, with failed trials."""
    root = tmp_path_factory.mktemp("browser")
    a = write_synthetic(root / "results-a", 300, sweep="vdproj-a", running=2, seed=1)
    b = write_synthetic(root / "results-b", 120, sweep="vdproj-b", seed=2, positions=False)
    return build_report([a, b], root / "reports" / "compare", title="Browser check")


def test_static_html_refers_to_nothing_outside_the_file(report):
    page = (report / "report.html").read_text()
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in page
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I)
    assert not re.search(r"url\(|@import|<script|<link|<iframe|<object|<embed", page, re.I)
    el = elements(page)
    for tag, attrs in el.tags:
        for name in ("src", "href", "srcset", "poster", "action", "data"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith("data:image/png;base64,") if name == "src" else value.startswith("#"), (tag, name, value[:80])
    images = el.of("img")
    assert len(images) == len(list(report.glob("*.png"))) >= 6  # front, test front, per variant, memory, positions, learning
    from matplotlib.image import imread

    for img in images:
        data = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert data == (report / img["data-file"]).read_bytes()
        pixels = imread(io.BytesIO(data), format="png")
        assert pixels.shape[:2] == (int(img["height"]), int(img["width"]))


def test_chromium_loads_it_offline_with_every_image_decoded(report, tmp_path):
    page = (report / "report.html").read_text()
    # 1. The report itself: the DOM after load, and the console free of blocked requests.
    r = run_chromium(tmp_path / "profile", "--dump-dom", (report / "report.html").as_uri())
    assert not CSP_VIOLATION.search(r.stderr), [l for l in r.stderr.splitlines() if CSP_VIOLATION.search(l)]
    dom = elements(r.stdout)
    ids = {a.get("id") for _t, a in dom.tags}
    assert set(SECTIONS) <= ids and "status" in ids
    assert len(dom.of("img")) == len(elements(page).of("img"))
    assert len(dom.of("table")) == 12  # frontier, leaderboard, per variant, overall, memory, hypervolume, positions, learning, scheduler, search, status, history
    assert "Partial results" in r.stdout and "still running" in r.stdout

    # 2. A copy with one checker script allowed by hash: after the load event it records how many images decoded.
    script = ("window.addEventListener('load', function () { var im = Array.from(document.images);"
              " var ok = im.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;"
              " document.body.setAttribute('data-images', ok + '/' + im.length); });")
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    probe = page.replace(CSP, f"{CSP}; script-src 'sha256-{digest}'").replace("</body>", f"<script>{script}</script>\n</body>")
    (report / "probe.html").write_text(probe)
    try:
        r = run_chromium(tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", (report / "probe.html").as_uri())
    finally:
        (report / "probe.html").unlink()
    assert not CSP_VIOLATION.search(r.stderr), r.stderr[-2000:]
    n = len(elements(page).of("img"))
    body = elements(r.stdout).of("body")[0]
    assert body.get("data-images") == f"{n}/{n}"


def test_the_browser_check_would_catch_an_external_request(tmp_path):
    """The console check is not vacuous: a page asking for a remote image is reported as blocked."""
    bad = tmp_path / "bad.html"
    bad.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}"></head>'
                   '<body><img src="http://example.invalid/x.png"></body></html>')
    r = run_chromium(tmp_path / "profile", "--dump-dom", bad.as_uri())
    assert CSP_VIOLATION.search(r.stderr)


def test_screenshot_of_the_report(report, tmp_path_factory, capsys):
    shot = tmp_path_factory.mktemp("screenshot") / "report-screenshot.png"
    run_chromium(tmp_path_factory.mktemp("profile"), f"--screenshot={shot}", "--window-size=1280,4000", "--hide-scrollbars",
                 (report / "report.html").as_uri())
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (4000, 1280)
    assert float(np.std(pixels[..., :3])) > 0.05  # not a blank page
    with capsys.disabled():
        print(f"\n[report screenshot: {shot}]\n[report: {report / 'report.html'}]")

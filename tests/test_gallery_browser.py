"""The gallery in a real headless Chromium: images load, index links work, a hostile caption stays text."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from dalle.runroot import METRICS
from dalle.sample.page import GalleryPage, Section, write_gallery_page
from dalle.sample.rerank import PromptSamples
from dalle.storage import Storage

HOSTILE = "a red circle <script>window.pwned = true; document.title = 'pwned'</script><img src=x onerror=\"window.pwned=true\">"
ARTIFACTS = Path(os.environ.get("DALLE_TEST_ARTIFACTS", "test-artifacts"))

# Chromium, quiet: no sandbox (root in CI), no GPU, and nothing that reaches the network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--metrics-recording-only",
]

HARNESS = """<!doctype html><html><body><iframe id="f" style="width:1200px;height:900px"></iframe>
<pre id="result">pending</pre><script>
function load(frame, url) {
  return new Promise(resolve => { frame.onload = () => resolve(); frame.src = url; });
}
async function settle(doc) {
  await Promise.all([...doc.images].map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; })));
}
function report(doc, win, href) {
  return {href, title: doc.title, images: doc.images.length,
          broken: [...doc.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
          scripts: doc.querySelectorAll('script').length, pwned: win.pwned === true,
          shows_caption: doc.body.innerText.includes("<script>window.pwned")};
}
(async () => {
  const frame = document.getElementById('f');
  const out = {pages: []};
  await load(frame, '/galleries/index.html');
  await settle(frame.contentDocument);
  out.index = report(frame.contentDocument, frame.contentWindow, 'index.html');
  const base = frame.contentWindow.location.href;
  const links = [...frame.contentDocument.querySelectorAll('a')].map(a => new URL(a.getAttribute('href'), base).href);
  for (const href of links) {
    await load(frame, href);
    await settle(frame.contentDocument);
    const page = report(frame.contentDocument, frame.contentWindow, href);
    page.back = [...frame.contentDocument.querySelectorAll('a')].map(a => new URL(a.getAttribute('href'), href).href);
    out.pages.push(page);
  }
  document.getElementById('result').textContent = JSON.stringify(out);
})();
</script></body></html>"""


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing (the test machines run as root)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("chromium is not installed; run `apt-get install chromium` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, timeout=900)
    return shutil.which("chromium")


def _serve(root: Path, harness: str) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/__harness.html":
                data = harness.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _samples(prompt: str, seed: int) -> PromptSamples:
    rng = np.random.default_rng(seed)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(6)]
    scores = rng.random(6).astype(np.float32)
    return PromptSamples(prompt, images, scores, [int(i) for i in np.argsort(-scores)])


def test_gallery_in_headless_chromium(tmp_path, chromium):
    root = tmp_path / "run"
    storage = Storage(str(root))
    storage.write_bytes(
        METRICS,
        b'{"model": "transformer", "step": 5, "loss": 3.1}\n{"model": "transformer", "step": 10, "loss": 2.4}\n',
    )
    for step in (5, 10):
        page = GalleryPage(
            step=step,
            checkpoint_uri=storage.uri(f"models/transformer/step_{step:08d}"),
            sections=[
                Section("held-out", [_samples(HOSTILE, step), _samples("a blue square", step + 1)], top=4)
            ],
            evaluation={
                "tasks": ["colors"],
                "levels": {
                    "heldout": {
                        "tasks": {"colors": {"before": 0.5, "after": 0.5 + step / 100}},
                        "overall": {"before": 0.5, "after": 0.5 + step / 100},
                    }
                },
            },
        )
        write_gallery_page(storage, page)

    server = _serve(root, HARNESS)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        done = _run(
            chromium,
            tmp_path / "profile",
            "--virtual-time-budget=20000",
            "--dump-dom",
            f"{url}/__harness.html",
        )
        assert done.returncode == 0, done.stderr[-2000:]
        result_text = done.stdout.split('<pre id="result">', 1)[1].split("</pre>", 1)[0]
        result = json.loads(result_text)

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "gallery.png"
        _run(chromium, tmp_path / "profile2", "--window-size=1200,1400", f"--screenshot={shot}",
             f"{url}/galleries/step_00000010/index.html")  # fmt: skip
    finally:
        server.shutdown()

    index = result["index"]
    assert index["broken"] == [] and index["images"] == 2  # loss and eval plots
    assert len(result["pages"]) == 2
    for page in result["pages"]:
        assert page["images"] == 8 and page["broken"] == [], page
        assert page["scripts"] == 0 and not page["pwned"], "a caption ran as markup"
        assert page["shows_caption"], "the caption must show as text"
        assert any(link.endswith("/galleries/index.html") for link in page["back"])
    assert {p["title"] for p in result["pages"]} == {"step 5", "step 10"}
    assert shot.exists() and PIL.Image.open(shot).size == (1200, 1400)

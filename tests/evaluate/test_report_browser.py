"""Reports as a browser shows them: a real headless Chromium (Debian's ``chromium``, driven by Playwright) opens
the HTML report from a file:// URL at a desktop and a phone width, and the DOM is checked: the verdict is in
the first screen, and nothing is wider than the page except inside a scroll container."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantship.config import Gate
from quantship.evaluate.tasks import PairedSample
from quantship.evaluate.verdicts import gate_verdict

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip

# Elements wider than the viewport whose nearest clipping ancestor is not a scroll container, as "tag.class".
OVERFLOW_JS = """() => {
  const width = document.documentElement.clientWidth;
  const bad = [];
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.right <= width + 1) continue;
    let a = el.parentElement, contained = false;
    while (a && a !== document.body) {
      const o = getComputedStyle(a).overflowX;
      if (o === 'auto' || o === 'scroll') { contained = a.getBoundingClientRect().right <= width + 1; break; }
      a = a.parentElement;
    }
    if (!contained) bad.push(el.tagName.toLowerCase() + (el.className ? '.' + el.className : ''));
  }
  return {bad: bad.slice(0, 10), pageWidth: document.documentElement.scrollWidth, width};
}"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium as root)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


def _signoff_folder(root: Path) -> Path:
    """A sign-off results folder as `quantship signoff` leaves it (rows, verdicts, plan, environment), with a
    long model path and an underpowered gate, built without running a model."""
    root.mkdir(parents=True)
    model = "/data/models/customer-a/efficientnet_lite0_finetuned_on_production_images_v17.keras"
    rows, verdicts = [], []
    for i, target in enumerate(["keras-fp32", "tflite-int8", "ort-int8-entropy", "qdq-int8-percentile"]):
        key = f"{i:016x}"
        rows.append(
            {"model": model, "target": target, "status": "ok", "images": 9, "top1": 0.78 - 0.01 * i, "top5": 0.93,
             "latency_ms": 3.1 + i, "threads": 2, "providers": ["CPUExecutionProvider"], "unit_key": key,
             "task": "classification", "dataset": "imagenet:/data/imagenet/val-subset-of-nine-photos"}
        )  # fmt: skip
        if i:
            ones = np.ones(9)
            for gate, paired in (
                (Gate(relative=0.99), PairedSample("top1", 1.0, 1.0, 9, per_image=(ones, ones))),
                (Gate(metric="agreement_top1", max_drop_points=1.0),
                 PairedSample("agreement_top1", 1.0, 1.0, 9, values=ones, binary=True)),
                (Gate(metric="mean_l1", maximum=0.3),
                 PairedSample("mean_l1", 0.05, 0.0, 9, values=np.full(9, 0.05), unit="L1 distance")),
            ):  # fmt: skip
                verdicts.append({"model": model, "target": target, "reference": "keras-fp32",
                                 **gate_verdict(gate, paired)})  # fmt: skip
    (root / "signoff.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "verdicts.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verdicts))
    plan = {"name": "release-candidate", "unit_keys": [r["unit_key"] for r in rows]}
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "environment.json").write_text(json.dumps({"cpu": "test CPU", "cpu_count": 2, "libraries": {}}))
    return root


def _demo_folder(root: Path) -> Path:
    """A demo results folder: rows, the demo's verdict and its prediction check with thumbnails."""
    root.mkdir(parents=True)
    rows = [{"model": "efficientnet_lite0", "target": t, "status": "ok", "images": 4, "top1": 0.75,
             "latency_ms": 5.0, "task": "classification"} for t in ("keras-fp32", "tflite-int8")]  # fmt: skip
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "verdict.json").write_text(json.dumps({"verdict": "PASS", "text": "every target has fp32's top-1 on 3"}))
    (root / "thumbnails").mkdir()
    import cv2

    ok, png = cv2.imencode(".png", np.full((120, 160, 3), 128, np.uint8))
    preds = []
    for photo, judged in (("chelsea", True), ("rocket", False)):
        (root / "thumbnails" / f"{photo}.png").write_bytes(png.tobytes())
        for target, top in (("keras-fp32", "tabby"), ("tflite-int8", "tiger cat" if not judged else "tabby")):
            preds.append({"photo": photo, "thumbnail": f"thumbnails/{photo}.png", "target": target, "judged": judged,
                          "truth": "tabby" if photo == "chelsea" else None, "ok": True,
                          "top3": [[top, 0.61], ["Egyptian cat, a very long class name for wrapping", 0.2],
                                   ["lynx", 0.1]]})  # fmt: skip
    (root / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    return root


@pytest.mark.parametrize("kind", ["signoff", "demo"])
def test_report_reads_in_a_browser_at_desktop_and_phone_width(browser, kind, tmp_path):
    from quantship.cli import main

    folder = (_signoff_folder if kind == "signoff" else _demo_folder)(tmp_path / kind)
    assert main(["report", str(folder)]) == 0  # the real command rebuilds the page from the stored files
    page_html = (folder / "report.html").read_text()
    url = (folder / "report.html").resolve().as_uri()
    for width, height in ((1400, 900), (390, 844)):
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        if kind == "signoff":
            assert page.title() == "sign-off: release-candidate"
        verdict = page.locator(".verdict").first
        box = verdict.bounding_box()
        assert box is not None and box["y"] + box["height"] <= height, f"verdict below the first screen at {width}"
        text = verdict.inner_text()
        if kind == "signoff":
            assert text.startswith("PASS, but 6 of 9 gates are underpowered"), text
            assert "underpowered" in verdict.get_attribute("class")
            assert page.locator("td.underpowered").count() == 6  # amber cells, not green
        else:
            assert text.startswith("PASS: every target has fp32's top-1"), text
            assert page.locator("li.differs").count() == 1  # rocket, int8 differs from fp32 (not judged)
            assert "not judged: fp32 is not confident" in page.content() and "ground truth: tabby" in page.content()
        layout = page.evaluate(OVERFLOW_JS)
        assert layout["pageWidth"] <= width and not layout["bad"], (width, layout)
        page.close()
    assert "name='viewport'" in page_html

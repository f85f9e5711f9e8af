"""The page to look at detections (ui/index.html served by scripts/ui.py) in a real browser (Playwright driving
Debian's Chromium, headless) against the suite's real TorchServe: the README example's detections drawn per model
in the model's colour, models and threshold chosen on the page, the service's own words for a bad file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import requests

from helpers import NAMES, ROOT, free_ports

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXAMPLE = ROOT / "docs" / "example.jpg"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium; .ci/run does)"),
]


@pytest.fixture(scope="module")
def page_url(server):
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "ui.py"), "--service", server.inference, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "scripts/ui.py did not start"
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(page_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(page_url)
        page.wait_for_selector("#models input")
        yield page
        browser.close()


def service_answer(server, body: bytes, **headers) -> dict:
    return requests.put(f"{server.inference}/predictions/all", data=body, headers=headers, timeout=120).json()


def shown(page) -> dict:
    return json.loads(page.inner_text("#raw"))


def test_the_example_is_drawn_per_model_in_its_colour(page, server, tmp_path):
    assert page.eval_on_selector_all("#models input", "es => es.map(e => e.value)") == list(NAMES)
    page.set_input_files("#file", str(EXAMPLE))
    page.wait_for_selector("#stage .box")
    answer = shown(page)
    expected = service_answer(server, EXAMPLE.read_bytes())
    assert [(d["model"], d["label"], d["box"]) for d in answer["detections"]] == [
        (d["model"], d["label"], d["box"]) for d in expected["detections"]
    ]
    boxes = page.locator("#stage .box")
    assert boxes.count() == len(expected["detections"]) > 0
    labels = boxes.all_inner_texts()
    for d, text in zip(answer["detections"], labels):
        assert text == f"{d['label']} {d['score']:.2f}"
    # each model's boxes in the colour of its legend swatch; every model in the legend with its count
    swatch = {
        row.get_attribute("data-model"): row.locator(".swatch").evaluate("e => getComputedStyle(e).backgroundColor")
        for row in page.locator("#legend tr").all()
    }
    assert list(swatch) == list(NAMES) and len(set(swatch.values())) == len(NAMES)
    for box in boxes.all():
        assert box.evaluate("e => getComputedStyle(e).borderTopColor") == swatch[box.get_attribute("data-model")]
    assert page.locator("#timings tr").count() == len(answer["timing_ms"]) + len(NAMES)
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)


def test_models_and_threshold_chosen_on_the_page_reach_the_service(page):
    page.set_input_files("#file", str(EXAMPLE))
    page.wait_for_selector("#stage .box")
    page.uncheck(f"#models input[value={NAMES[0]}]")
    page.wait_for_function(f"() => !document.querySelector('#stage .box[data-model={NAMES[0]}]')")
    page.wait_for_function(f"() => !document.querySelector('#raw').textContent.includes('\"name\": \"{NAMES[0]}\"')")
    assert [m["name"] for m in shown(page)["models"]] == list(NAMES[1:])
    page.check(f"#models input[value={NAMES[0]}]")
    page.eval_on_selector("#threshold", "e => { e.value = '0.9'; e.dispatchEvent(new Event('change')); }")
    page.wait_for_function(
        f"() => JSON.parse(document.querySelector('#raw').textContent).models.length === {len(NAMES)}"
    )
    page.wait_for_function(
        "() => JSON.parse(document.querySelector('#raw').textContent).detections.every(d => d.score >= 0.9)"
    )
    assert page.locator("#stage .box").count() == len(shown(page)["detections"])


def test_a_bad_file_shows_the_services_own_words(page, server):
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}])
    page.wait_for_selector("#error", state="visible")
    err = service_answer(server, b"not an image")
    assert page.inner_text("#error") == f"{err['code']} {err['type']}: {err['message']}"
    assert page.locator("#stage .box").count() == 0

"""The web page in headless Chromium (Debian's ``chromium`` through Playwright; Playwright's own
browser downloads are never used): generate from the form, watch the progress bar and the
picture, send it to img2img, read a PNG's parameters."""

from __future__ import annotations

import base64
import io
import os

import pytest
from conftest import chromium
from PIL import Image

CHROMIUM = chromium()
# Skipped where chromium is absent, except in CI (CI=true), whose .ci/run installs it.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="no chromium on PATH (install it: apt-get install -y chromium; CI does)",
)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("CI=true but no chromium on PATH: .ci/run should have installed it")
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


def test_generate_from_the_page(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")

    # every control has a label a screen reader announces
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, canvas[tabindex]')]
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
            .map(e => e.id || e.outerHTML)"""
    )
    assert unlabelled == []
    assert "Euler a" in page.locator("#sampler").inner_text()
    assert page.locator("#model").input_value() == "tiny.safetensors"

    page.get_by_label("Prompt", exact=True).fill("a green square")
    page.get_by_label("Sampler").select_option("Euler a")
    page.get_by_label("Steps").fill("40")
    page.get_by_label("Seed (-1: random)").fill("21")
    page.get_by_label("Width").fill("32")
    page.get_by_label("Height").fill("32")
    page.get_by_label("Prompt", exact=True).focus()
    page.keyboard.press("Control+Enter")  # the keyboard way to generate

    page.wait_for_function("Number(document.body.dataset.progressSeen || 0) > 0")
    assert 0 < float(page.locator("#progress").get_attribute("value") or page.evaluate(
        "document.getElementById('progress').value")) <= 1  # fmt: skip
    page.wait_for_selector("#gallery img", timeout=120_000)
    page.wait_for_function("document.body.dataset.done === '1'")
    assert page.evaluate("document.getElementById('progress').value") == 1
    assert page.locator("#preview").get_attribute("src").startswith("data:image/png;base64,")
    caption = page.locator("#gallery pre").first.inner_text()
    assert "Seed: 21" in caption and "Steps: 40" in caption and "Size: 32x32" in caption
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    # the picture's PNG carries its parameters: drop it on the PNG-info zone
    data = page.locator("#gallery img").first.get_attribute("src").partition(",")[2]
    picture = Image.open(io.BytesIO(base64.b64decode(data)))
    assert picture.size == (32, 32) and "Seed: 21" in picture.info["parameters"]
    (tmp_path / "made.png").write_bytes(base64.b64decode(data))
    page.get_by_label("Drop a PNG here, or choose one").set_input_files(str(tmp_path / "made.png"))
    page.wait_for_function("document.getElementById('png-params').textContent.includes('Seed: 21')")
    page.get_by_label("Seed (-1: random)").fill("-1")
    page.get_by_role("button", name="Use these settings").click()
    assert page.get_by_label("Seed (-1: random)").input_value() == "21"

    # send to img2img, paint a mask with the keyboard, generate again
    page.get_by_role("button", name="Send to img2img").first.click()
    assert page.locator("#img2img").is_visible()
    page.wait_for_function("document.getElementById('mask').width === 32")
    page.get_by_label("Steps").fill("4")
    page.get_by_label("Mask painting area").focus()
    for key in ("Space", "ArrowRight", "Space", "ArrowDown", "Space"):
        page.keyboard.press(key)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.body.dataset.done === '2'", timeout=120_000)
    assert page.locator("#gallery img").count() == 2
    caption = page.locator("#gallery pre").first.inner_text()
    assert "Denoising strength: 0.6" in caption
    page.screenshot(path=str(tmp_path / "page-img2img.png"), full_page=True)

    # the model switcher loads the other checkpoint in the background, then comes back
    for title in ("other.safetensors", "tiny.safetensors"):
        page.get_by_label("Model").select_option(title)
        page.locator("#model-status").filter(has_text=f"{title} loaded").wait_for()
    assert errors == []


def test_the_page_shows_a_bad_value(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    page.get_by_label("Width").fill("33")  # the form itself refuses what is not a multiple of 8
    assert page.locator("#width").evaluate("e => e.validity.valid") is False
    # what only the server knows: 16 pictures of 4096 x 4096 are past its pixel limit
    page.get_by_label("Width").fill("4096")
    page.get_by_label("Height").fill("4096")
    page.get_by_label("Batch size").fill("16")
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    alert.filter(has_text="batch_size").wait_for()
    assert "422" in alert.inner_text() and "Mpx" in alert.inner_text()


def test_the_page_behind_credentials(guarded, browser):
    context = browser.new_context(http_credentials={"username": "bob", "password": "hunter2"})
    page = context.new_page()
    page.goto(guarded.url + "/")
    page.wait_for_selector("body[data-ready='1']")  # fetch() carries the credentials
    page.get_by_label("Steps").fill("12")
    page.get_by_label("Width").fill("32")
    page.get_by_label("Height").fill("32")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.body.dataset.done === '1'", timeout=120_000)
    # and so does the progress stream (EventSource)
    assert int(page.evaluate("document.body.dataset.progressSeen || '0'")) > 0
    context.close()

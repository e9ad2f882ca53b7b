"""The studio page in headless Chromium: strokes and a mask drawn with the mouse, Edit, result.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package
(``.ci/run`` installs them); skipped, with the reason, where any is missing.
"""

from __future__ import annotations

import base64
import io
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from sdedit_jax import pretrained
from sdedit_jax.studio import previews, server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no headless browser: apt-get install chromium chromium-driver",
)


def _decode(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


@pytest.fixture(scope="module")
def studio_url(tiny_model_dir, tmp_path_factory):
    previewer = previews.Previewer(pretrained.load_model(tiny_model_dir), per_device_batch=1)
    previewer.warm()
    dataset = str(tmp_path_factory.mktemp("dataset"))
    studio = server.Studio(previewer, tiny_model_dir, dataset)
    httpd = server.StudioServer(("127.0.0.1", 0), studio)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    previewer.start()
    yield httpd.url
    httpd.shutdown()
    httpd.server_close()
    previewer.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    except WebDriverException as e:  # an installed browser that cannot start here
        pytest.skip(f"chromium does not start: {str(e).splitlines()[0]}")
    yield driver
    driver.quit()


def _stroke(browser, element, points) -> None:
    """A mouse drag through ``points`` (fractions of the element, from its top-left)."""
    from selenium.webdriver.common.action_chains import ActionChains

    width, height = element.size["width"], element.size["height"]
    offsets = [(round((x - 0.5) * width), round((y - 0.5) * height)) for x, y in points]
    chain = ActionChains(browser).move_to_element_with_offset(element, *offsets[0])
    chain.click_and_hold()
    for x, y in offsets[1:]:
        chain.move_to_element_with_offset(element, x, y)
    chain.release().perform()


def test_draw_strokes_and_a_mask_then_edit(browser, studio_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(studio_url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
    assert not browser.find_element(By.ID, "prompt-row").is_displayed()  # a pixel model
    canvas = browser.find_element(By.ID, "ui")
    _stroke(browser, canvas, [(0.1, 0.2), (0.5, 0.25), (0.9, 0.3)])  # red brush
    browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=mask]").click()
    _stroke(browser, canvas, [(0.25, 0.1), (0.25, 0.9)])
    samples = browser.find_element(By.ID, "samples")
    samples.clear()
    samples.send_keys("2")
    guide = _decode(browser.execute_script("return composedGuide().toDataURL('image/png')"))
    mask = _decode(browser.execute_script("return maskPNG()"))[..., 0]
    browser.find_element(By.ID, "edit").click()
    wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("done"))
    assert browser.find_element(By.ID, "status").text == "done: 2 results"
    result = browser.find_elements(By.CSS_SELECTOR, "#gallery img.result")
    output = _decode(result[0].get_attribute("src"))
    assert not np.array_equal(output, _decode(result[1].get_attribute("src")))
    browser.find_elements(By.CSS_SELECTOR, "#gallery figure button")[1].click()  # seed 1
    wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("saved"))
    assert "-s1 to " in browser.find_element(By.ID, "status").text

    red = (guide[..., 0] > 150) & (guide[..., 1] < 120)
    assert red[:, 8:].sum() >= 6  # the brush stroke, right of the mask
    assert 16 <= (mask == 255).sum() and (mask == 0).sum() >= 150  # a vertical band
    assert output.shape == (16, 16, 3)
    outside = mask == 0
    np.testing.assert_array_equal(output[outside], guide[..., :3][outside])
    inside = mask == 255
    assert np.abs(output[inside].astype(int) - guide[..., :3][inside]).mean() > 5


def test_undo_redo_mask_from_strokes_and_save(browser, studio_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(studio_url)
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "status").text == "ready")
    canvas = browser.find_element(By.ID, "ui")
    paint = (
        "return ctx('paint').getImageData(0, 0, size(), size()).data.filter((v, i) => i % 4 == 3)"
    )
    _stroke(browser, canvas, [(0.5, 0.1), (0.5, 0.9)])
    drawn = np.array(browser.execute_script(paint))
    browser.find_element(By.ID, "undo").click()
    assert not np.array(browser.execute_script(paint)).any()
    browser.find_element(By.ID, "redo").click()
    np.testing.assert_array_equal(browser.execute_script(paint), drawn)

    browser.find_element(By.ID, "mask-from-strokes").click()  # dilation 2 (the default)
    mask = _decode(browser.execute_script("return maskPNG()"))[..., 0] > 0
    stroke = drawn.reshape(16, 16) > 0
    assert mask[stroke].all() and mask.sum() > stroke.sum()
    columns = np.flatnonzero(mask.any(axis=0))
    stroke_columns = np.flatnonzero(stroke.any(axis=0))
    assert (columns.min(), columns.max()) == (stroke_columns.min() - 2, stroke_columns.max() + 2)

    browser.find_element(By.ID, "save").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "command").text)
    command = browser.find_element(By.ID, "command").text
    assert " -m sdedit_jax.main " in command and "--config.input.source=manifest" in command
    assert browser.find_element(By.ID, "status").text.startswith("saved studio-")


def test_composite_placed_with_the_mouse_and_the_eyedropper(browser, studio_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    donor = np.random.default_rng(5).integers(0, 256, (10, 12, 3)).astype(np.uint8)
    Image.fromarray(donor).save(tmp_path / "donor.png")
    browser.get(studio_url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
    browser.find_element(By.ID, "donor-file").send_keys(str(tmp_path / "donor.png"))
    wait.until(lambda b: b.find_element(By.ID, "composite-state").text)
    donor_canvas = browser.find_element(By.ID, "donor")
    _stroke(browser, donor_canvas, [(2.5 / 12, 1.5 / 10), (6.5 / 12, 4.5 / 10)])  # box 2,1,7,5
    browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=place]").click()
    canvas = browser.find_element(By.ID, "ui")
    _stroke(browser, canvas, [(9.5 / 16, 10.5 / 16)])
    assert browser.find_element(By.ID, "composite-state").text == "box 2,1,7,5, at 9,10"
    browser.find_element(By.ID, "apply-composite").click()
    guide_js = "return composedGuide().toDataURL('image/png')"
    wait.until(lambda b: _decode(b.execute_script(guide_js))[..., :3].min() < 255)

    expected = np.full((16, 16, 3), 255, np.uint8)  # the blank canvas is white
    expected[10:14, 9:14] = donor[1:5, 2:7]
    np.testing.assert_array_equal(_decode(browser.execute_script(guide_js))[..., :3], expected)
    mask = _decode(browser.execute_script("return maskPNG()"))[..., 0]
    expected_mask = np.zeros((16, 16), np.uint8)
    expected_mask[10:14, 9:14] = 255
    np.testing.assert_array_equal(mask, expected_mask)

    browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=eyedropper]").click()
    _stroke(browser, canvas, [(11.5 / 16, 12.5 / 16)])
    colour = browser.find_element(By.ID, "colour").get_attribute("value")
    assert colour == "#" + bytes(donor[3, 4]).hex()

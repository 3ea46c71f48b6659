"""The web page in a real browser: headless Chromium (Debian's package) driven by Selenium.

scripts/test.sh installs chromium + chromium-driver where apt is available (CI); elsewhere this test
skips and says why. Screenshots are saved under the test's tmp dir and their paths printed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from lmforge.serve import ServerThread, build_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _browser():
    if not Path(CHROMIUM).is_file() or not Path(CHROMEDRIVER).is_file():
        pytest.skip(
            "headless browser test needs Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; scripts/test.sh does this where it can)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="lmforge-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1100",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER)), profile


@pytest.fixture
def browser():
    driver, profile = _browser()
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _set_slider(driver, element_id: str, value: float) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];e.dispatchEvent(new Event('input'));",
        element_id,
        value,
    )


def _painted_pixels(driver, canvas_id: str) -> int:
    """Pixels of a canvas that are neither transparent nor white/light grey (i.e. heatmap colours)."""
    return driver.execute_script(
        """
        const c = document.getElementById(arguments[0]);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && (d[i] < 200 || d[i + 2] < 200)) n++;
        return n;""",
        canvas_id,
    )


@pytest.mark.slow
def test_web_page_in_headless_chromium(tiny_run, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = []
    with ServerThread(build_app(tiny_run)) as url:
        d = browser
        wait = WebDriverWait(d, 60)
        find = lambda element_id: d.find_element(By.ID, element_id)  # noqa: E731
        d.get(f"{url}/")
        wait.until(lambda _: find("run-name").text == tiny_run.name)
        assert find("temperature-v").text == "0.8"  # sampling values are shown
        # the answer style defaults to the run's eval.decoding (the tiny recipe generates: greedy)
        assert Select(find("answer-style")).first_selected_option.get_attribute("value") == "sample"

        # ask a question; count DOM updates of the output to see that the text really streams in
        _set_slider(d, "temperature", 0)
        _set_slider(d, "max_tokens", 24)
        _set_slider(d, "min_tokens", 8)  # a barely trained model may end its answer at once; make it talk
        assert find("temperature-v").text == "0 (greedy)" and find("max_tokens-v").text == "24"
        find("question").clear()
        find("question").send_keys("What is the capital of France?")
        Select(find("answer-style")).select_by_value("sample")  # generated: streams token by token
        d.execute_script(
            "window.__updates = 0; new MutationObserver(() => window.__updates++)"
            ".observe(document.getElementById('output'), {subtree: true, childList: true, characterData: true});"
        )
        find("generate").click()
        wait.until(lambda _: find("gen-status").text in ("done", "error"))
        assert find("gen-status").text == "done", find("output").text
        assert find("output").text.strip()
        assert d.execute_script("return window.__updates") > 2
        assert "tokens/s" in find("gen-stats").text
        wait.until(lambda _: find("focus-card").is_displayed())
        assert len(d.find_elements(By.CSS_SELECTOR, "#focus-bars .bar")) > 5  # input focus bars, one per word
        shots.append(tmp_path / "generate.png")
        d.save_screenshot(str(shots[-1]))

        # a span answer: a piece of the context, whole
        Select(find("answer-style")).select_by_value("span")
        find("generate").click()
        wait.until(lambda _: find("gen-status").text in ("done", "error"))
        assert find("gen-status").text == "done", find("output").text
        assert find("output").text.strip() and find("output").text.strip() in find("context").get_attribute("value")

        # the attention explorer: a rendered heatmap and the most-attended list
        find("tab-attention").click()
        wait.until(lambda _: "words" in find("attn-info").text)
        assert _painted_pixels(d, "heatmap") > 1000
        n_words = int(find("attn-info").text.split()[0])
        assert len(d.find_elements(By.CSS_SELECTOR, "#top-list li")) == n_words
        find("attn-discount").click()
        wait.until(lambda _: "words" in find("attn-info").text)
        assert "attention sink" in find("panel-attention").text  # the toggle is explained
        shots.append(tmp_path / "attention.png")
        d.save_screenshot(str(shots[-1]))

        # switch to the pretrained checkpoint, then free memory
        d.find_element(By.CSS_SELECTOR, "#checkpoint-switch button[data-checkpoint='pretrained']").click()
        wait.until(lambda _: "pretrained" in find("model-info").text)
        find("free-memory").click()
        wait.until(lambda _: "freed" in find("memory-note").text)
        assert "unloaded best" in find("memory-note").text
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    for shot in shots:
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")

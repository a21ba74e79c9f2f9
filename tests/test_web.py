"""The chat page in headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium) against a real cluster on the default model. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import ARTIFACTS, DEVICE, Cluster, free_port, wait_for

from zmqchat.models import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.model  # every test here runs the real default model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
UI_TIMEOUT = 120  # seconds for the page to show what the model says, on a small CPU


def ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver when they are missing and we may."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium and chromium-driver are missing, and installing them needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True, timeout=900,
                   env=env)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def web_cluster(module_cluster):
    module_cluster.broker()
    module_cluster.worker("--device", DEVICE, "--max-batch", "2", fake=False)
    module_cluster.api()
    return module_cluster


def model_options(driver) -> list[str]:
    # Read in one go: the picker is rebuilt when the models load, which stales held elements.
    return driver.execute_script("return Array.from(document.querySelectorAll('#model option'), o => o.text)")


class Page:
    """The chat page, as a user works it."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        driver.get(url)
        wait_for(lambda: DEFAULT_MODEL_NAME in self.models(), 30, "the model picker to fill")

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def all(self, css: str):
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def models(self) -> list[str]:
        return model_options(self.driver)

    def set(self, css: str, value: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(value)

    def ask(self, text: str) -> None:
        self.set("#prompt", text)
        self.find("#send").click()

    def replies(self) -> list[str]:
        return [e.text for e in self.all(".message.assistant .content")]

    def finished_replies(self) -> int:
        return len(self.all(".message.assistant .meta"))

    def js(self, script: str):
        return self.driver.execute_script(script)


def test_chat_page_talks_streams_stops_and_remembers(browser, web_cluster):
    from selenium.webdriver.support.ui import Select

    page = Page(browser, f"{web_cluster.url}/")
    assert page.models() == [DEFAULT_MODEL_NAME]
    Select(page.find("#model")).select_by_visible_text(DEFAULT_MODEL_NAME)
    page.set("#temperature", "0")
    page.set("#max-tokens", "40")

    page.ask("What is the capital of France?")
    wait_for(lambda: page.finished_replies() == 1, UI_TIMEOUT, "the first reply")
    assert "Paris" in page.replies()[0]
    assert "first token" in page.find(".message.assistant .meta").text
    assert "tokens/s" in page.find(".message.assistant .meta").text

    page.ask("And of Germany?")  # only makes sense with the first turn
    wait_for(lambda: page.finished_replies() == 2, UI_TIMEOUT, "the second reply")
    sent = page.js("return window.zmqchat.lastRequest.messages")
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[0]["content"] == "What is the capital of France?" and "Paris" in sent[1]["content"]
    assert "Berlin" in page.replies()[1]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web-chat.png"))

    page.set("#max-tokens", "1000")
    page.ask("Write a very long story about a dragon who learns to fly.")
    wait_for(lambda: len(page.replies()[2]) > 40, UI_TIMEOUT, "the long reply to stream in")
    assert web_cluster.status()["models"][DEFAULT_MODEL_NAME]["free"] == 1  # it holds a slot
    page.find("#stop").click()
    wait_for(lambda: web_cluster.status()["models"][DEFAULT_MODEL_NAME]["free"] == 2, 10,
             "the stopped reply's slot to be free")
    wait_for(lambda: "2/2" in page.find("#cluster").text, 10, "the cluster panel to show the slot free")
    assert "stopped" in page.all(".message.assistant .meta")[2].text
    browser.save_screenshot(str(ARTIFACTS / "web-chat-stopped.png"))


def test_replies_are_escaped_not_run_as_html(browser, web_cluster):
    page = Page(browser, f"{web_cluster.url}/")
    rendered = page.js("return renderMarkdown('<img src=x onerror=alert(1)> **bold** `code`\\n```\\n<b>x</b>\\n```')")
    assert "<img" not in rendered and "&lt;img" in rendered
    assert "<strong>bold</strong>" in rendered and "<code>code</code>" in rendered and "&lt;b&gt;" in rendered


def test_a_key_protected_server_says_so_and_works_with_the_key(browser, web_cluster):
    keyed = Cluster(web_cluster.tmp_path, frontend=web_cluster.frontend, backend=web_cluster.backend,
                    port=free_port())
    keyed.api("--api-key", "sesame")
    try:
        browser.get(f"{keyed.url}/")
        browser.execute_script("localStorage.removeItem('zmqchat-api-key')")
        browser.get(f"{keyed.url}/")
        from selenium.webdriver.common.by import By

        wait_for(lambda: "needs an API key" in browser.find_element(By.ID, "conversation").text, 30,
                 "the page to ask for a key")
        field = browser.find_element(By.ID, "api-key")
        field.send_keys("sesame")
        browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        wait_for(lambda: DEFAULT_MODEL_NAME in model_options(browser), 30, "the models once the key is given")
    finally:
        keyed.stop()


def test_the_page_fits_a_phone(browser, web_cluster):
    browser.set_window_size(390, 844)
    try:
        page = Page(browser, f"{web_cluster.url}/")
        assert not page.find("#settings").is_displayed()  # tucked away behind a button
        page.find("#toggle-settings").click()
        assert page.find("#settings").is_displayed()
        width = page.js("return document.documentElement.scrollWidth")
        assert width <= 390, "the page scrolls sideways on a phone"
        browser.save_screenshot(str(ARTIFACTS / "web-chat-phone.png"))
    finally:
        browser.set_window_size(1280, 900)

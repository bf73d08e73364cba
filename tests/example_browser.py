"""A real browser double-clicks Pay on an example shop's checkout page: one PaymentIntent, one
charge.

Debian's chromium and chromedriver (packages ``chromium`` and ``chromium-driver``), driven by
Selenium; the shop runs with two workers on SQLite, with localstripe as Stripe. Each example's
browser test imports this and names its example with an ``example_name`` fixture.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.example_server import ExampleServer, list_all
from tests.fixtures import unavailable


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        unavailable("needs Debian's chromium and chromium-driver packages")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(executable_path=str(driver)), options=options)
    try:
        yield session
    finally:
        session.quit()


@pytest.fixture(scope="module")
def shop(
    example_name: str, localstripe_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExampleServer]:
    env = {
        "IDEMPAY_DATABASE_URL": f"sqlite:///{tmp_path_factory.mktemp('browser') / 'shop.db'}",
        "IDEMPAY_LOCK_URL": "memory://",
        "STRIPE_API_KEY": "sk_test_browser",
        "STRIPE_API_BASE": localstripe_url,
        "STRIPE_WEBHOOK_SECRET": "whsec_browser",
    }
    with ExampleServer(example_name, env, workers=2) as server:
        yield server


def test_a_double_click_on_pay_is_one_charge(
    browser: Any, shop: ExampleServer, localstripe_url: str
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(shop.url + "/")
    order_id = browser.find_element(By.ID, "order").text
    assert order_id.startswith("web-")
    ActionChains(browser).double_click(browser.find_element(By.ID, "pay")).perform()
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "count").text == "2")
    lines = browser.find_element(By.ID, "result").text.splitlines()
    assert len(lines) == 2
    # Both clicks were answered: the first created the payment, the second got it replayed
    # (or a 409 while the first was still in flight).
    assert all(line.split()[0] in ("201", "409") for line in lines), lines

    with httpx.Client(base_url=localstripe_url, auth=("sk_test_browser", ""), timeout=30) as api:
        intents = [
            pi
            for pi in list_all(api, "/v1/payment_intents")
            if pi.get("metadata", {}).get("order_id") == order_id
        ]
        assert len(intents) == 1
        assert intents[0]["status"] == "succeeded"
        charges = [
            ch
            for ch in list_all(api, "/v1/charges")
            if ch.get("payment_intent") == intents[0]["id"] and ch.get("status") == "succeeded"
        ]
    assert len(charges) == 1
    view = httpx.get(f"{shop.url}/orders/{order_id}", timeout=30).json()
    assert view["status"] == "paid"

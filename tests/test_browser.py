"""The magic link end to end (PROTOCOL §6.1) in a real headless Chromium against real gunicorn
with two workers and a real SMTP server on loopback.

Needs Debian's `chromium chromium-driver` (.ci/run installs them). Selenium Manager never runs:
the driver and the browser are always given by path, so nothing is downloaded.
"""

from __future__ import annotations

import re
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.live import clean_env, free_port, gunicorn
from tests.smtp import StartServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPLAY_REFUSED = "This sign-in link is invalid, expired or already used."


class LinkFinder(HTMLParser):
    """The href of every <a> in an HTML document (entities already unescaped)."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [value for name, value in attrs if name == "href" and value]


def sign_in_link(message: EmailMessage, issuer: str) -> str:
    """The landing link from the text/plain part, checked to be the one the text/html links to."""
    plain, rich = message.get_body(("plain",)), message.get_body(("html",))
    assert isinstance(plain, EmailMessage) and isinstance(rich, EmailMessage)
    pattern = re.escape(issuer) + r"/auth/email/landing#t=[A-Za-z0-9_-]{43,}"
    links: list[str] = re.findall(pattern, plain.get_content())
    assert len(links) == 1, links
    link = links[0]
    finder = LinkFinder()
    finder.feed(rich.get_content())
    assert finder.hrefs == [link]
    return link


def require_chromium() -> None:
    """Fail, never skip: CI installs the packages, so a missing browser is a broken set-up."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: the browser test needs Debian's packages, "
            "install them with `apt-get install -y chromium chromium-driver` (.ci/run does)"
        )


def chromium(tmp_path: Path) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(10)
    return driver


def console(driver: WebDriver) -> list[str]:
    """Browser console messages since the last call (chromedriver drains the log on reading)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [str(entry["message"]) for entry in entries]


def poll(base: str, started: dict[str, Any]) -> dict[str, Any]:
    response = requests.get(
        base + started["poll_url"],
        headers={"Authorization": f"Bearer {started['poll_token']}"},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def result_text(driver: WebDriver, needle: str) -> str:
    """The #result text once it contains `needle` (at most 10 s: the click must do something)."""
    result = driver.find_element(By.ID, "result")
    try:
        WebDriverWait(driver, 10).until(lambda _: needle in result.text)
    except TimeoutException:
        pytest.fail(
            f"#result shows {result.text!r}, not {needle!r}; browser console: {console(driver)}"
        )
    return str(result.text)


def open_landing(driver: WebDriver, link: str) -> None:
    """A fresh load of the landing page (a fragment-only change would not reload it)."""
    driver.get("about:blank")
    driver.get(link)
    button = driver.find_element(By.ID, "approve")
    assert button.text == "Approve" and button.is_enabled()


def assert_strict_headers(base: str) -> None:
    response = requests.get(base + "/auth/email/landing", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    csp = response.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    nonce = re.search(r"script-src 'nonce-([A-Za-z0-9_-]{16,})'", csp)
    assert nonce, csp
    assert f'<script nonce="{nonce.group(1)}">' in response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    again = requests.get(base + "/auth/email/landing", timeout=5)
    assert again.headers["Content-Security-Policy"] != csp  # a fresh nonce per response


def test_magic_link_in_chromium(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smtp_server: StartServer
) -> None:
    require_chromium()
    monkeypatch.setenv("SE_OFFLINE", "true")  # belt and braces: Selenium Manager fetches nothing
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    mailbox = smtp_server()
    smtp_port, inbox = mailbox.port, mailbox.recorder
    env = clean_env(
        AGENTKEYS_ENV="development",
        AGENTKEYS_ISSUER=issuer,
        DATABASE_URL=f"sqlite:///{tmp_path / 'agentkeys.sqlite3'}",
        AGENTKEYS_MAIL_URL=f"smtp://127.0.0.1:{smtp_port}",
    )
    with gunicorn(env, workers=2, port=port) as base:
        assert_strict_headers(base)

        response = requests.post(
            base + "/v1/auth/email/request", json={"email": "alice@example.com"}, timeout=10
        )
        assert response.status_code == 202, response.text
        started = response.json()
        assert poll(base, started) == {"status": "pending"}
        message = inbox.message()
        assert message["To"] == "alice@example.com"
        link = sign_in_link(message, issuer)

        driver = chromium(tmp_path)
        try:
            # Opening the link (as a mail scanner would) burns nothing.
            open_landing(driver, link)
            assert poll(base, started) == {"status": "pending"}

            driver.find_element(By.ID, "approve").click()
            shown = result_text(driver, started["user_code"])
            assert shown.startswith("Approved.")
            assert "#" not in driver.current_url  # the token leaves the history entry

            verified = poll(base, started)
            assert verified["status"] == "verified"
            assert verified["identity_type"] == "email"
            assert verified["session_jwt"].count(".") == 2
            assert poll(base, started) == {"status": "consumed"}

            # The same link again: the page loads, but the server refuses the replay.
            open_landing(driver, link)
            driver.find_element(By.ID, "approve").click()
            assert result_text(driver, REPLAY_REFUSED) == REPLAY_REFUSED
            assert driver.find_element(By.ID, "result").get_attribute("class") == "error"

            violations = [m for m in console(driver) if "Content Security Policy" in m]
            assert violations == [], violations

            # Control: the log check can see a violation (an inline script without the
            # nonce is refused and reported), so the assertion above is not vacuous.
            driver.execute_script(
                "var s = document.createElement('script');"
                "s.textContent = 'document.title = \"inline ran\"';"
                "document.body.appendChild(s);"
            )
            WebDriverWait(driver, 5).until(
                lambda _: any("Content Security Policy" in m for m in console(driver))
            )
            assert driver.title != "inline ran"
        finally:
            driver.quit()

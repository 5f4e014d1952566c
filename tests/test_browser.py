"""`wsgate demo` in a real browser: Debian's headless Chromium, driven by selenium.

The demo runs as a subprocess (`wsgate demo --port 0 --admin-port 0`) and is used
as a newcomer would: the chat page in tabs, the admin dashboard in another, its
buttons to stop and start a backend. Selenium uses the system's chromedriver and
chromium by explicit path and never runs Selenium Manager, so nothing is
downloaded. Every wait is a WebDriverWait on a condition, bounded.

The screenshots are saved as artifacts under pytest's temporary directory, or in
the directory that WSGATE_SCREENSHOTS names: `WSGATE_SCREENSHOTS=docs
./scripts/test.sh tests/test_browser.py` writes the README's two.

The last test runs a gateway in-process with an `http2: true` TLS listener and
checks that Chromium, given the page over HTTP/2, opens its WebSockets as RFC 8441
streams of that connection (selenium's blocking calls run in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    if os.environ.get("CI"):
        raise RuntimeError("scripts/test.sh installs chromium and chromium-driver; they are missing")
    pytest.skip("needs Debian's chromium and chromium-driver (scripts/test.sh installs them)",
                allow_module_level=True)

import trustme  # noqa: E402
from conftest import gateway_config  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common import selenium_manager  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

# Without the background-networking flags Chromium phones home at start, which a
# closed network refuses, and its own connections then get in the way.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Tabs in the background keep their timers and sockets at full speed.
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows", "--window-size=1280,860",
)
# How long one step may take: a page change, a failover, a health flip.
STEP = 15.0
POLL = 0.05


class Demo:
    """`wsgate demo` on ephemeral ports: the chat page's URL and the dashboard's."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wsgate", "demo", "--port", "0", "--admin-port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            self.page_url = self._wait_for(r"open (http://127\.0\.0\.1:\d+/) in a browser")
            self.dashboard_url = self._seen(r"dashboard at (http://127\.0\.0\.1:\d+/dashboard)")
        except BaseException:
            self.stop()  # a demo that never announced itself is not left running
            raise

    def _wait_for(self, pattern: str) -> str:
        assert self.process.stdout is not None
        self.lines: list[str] = []
        # A thread reads the lines, so that the wait for each is bounded by a timeout.
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.process.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        deadline = time.monotonic() + STEP
        for _ in range(20):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match.group(1)
        raise AssertionError(f"no line matching {pattern!r} in {self.lines}")

    def _seen(self, pattern: str) -> str:
        found = [m.group(1) for line in self.lines if (m := re.search(pattern, line))]
        assert found, self.lines
        return found[0]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(STEP)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def demo() -> Iterator[Demo]:
    started = Demo()
    yield started
    started.stop()


def chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra_flags: str) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, from the system's paths only."""

    def no_downloads(*args: object, **kwargs: object) -> None:
        raise AssertionError("Selenium Manager ran: it would look for (and download) a browser")

    monkeypatch.setattr(selenium_manager.SeleniumManager, "binary_paths", no_downloads)
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, *extra_flags):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    yield from chromium(tmp_path, monkeypatch)


@pytest.fixture
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: WSGATE_SCREENSHOTS (docs/ for the README's), else a temp dir."""
    chosen = os.environ.get("WSGATE_SCREENSHOTS")
    directory = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def wait(driver: WebDriver, condition: Callable[[], object], message: str) -> object:
    """`condition()` once it is true, polled; the dashboard redraws, so a stale element means "again"."""
    ignored = [NoSuchElementException, StaleElementReferenceException]
    waiting = WebDriverWait(driver, STEP, poll_frequency=POLL, ignored_exceptions=ignored)
    return waiting.until(lambda d: condition(), message)


def click(driver: WebDriver, selector: str) -> None:
    def clicked() -> bool:
        driver.find_element(By.CSS_SELECTOR, selector).click()
        return True

    wait(driver, clicked, f"click {selector}")


def body(driver: WebDriver, name: str) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute(f"data-{name}") or ""


def text(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


class Tabs:
    """The browser's tabs by name; `use(name)` switches to one."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver
        self.handles: dict[str, str] = {}

    def open(self, name: str, url: str) -> None:
        if self.handles:
            self.driver.switch_to.new_window("tab")
        self.handles[name] = self.driver.current_window_handle
        self.driver.get(url)

    def use(self, name: str) -> WebDriver:
        self.driver.switch_to.window(self.handles[name])
        return self.driver


def join(tabs: Tabs, name: str, url: str) -> str:
    """Open the chat page in a new tab; the backend it names once connected."""
    tabs.open(name, url)
    driver = tabs.driver
    wait(driver, lambda: body(driver, "state") == "open" and body(driver, "backend"), f"{name} connects")
    return body(driver, "backend")


def say(driver: WebDriver, words: str) -> None:
    field = driver.find_element(By.ID, "say")
    field.send_keys(words)
    driver.find_element(By.ID, "send").click()


def messages(driver: WebDriver) -> list[tuple[str, str]]:
    """(text, backend) of every message the page shows."""
    items = driver.find_elements(By.CSS_SELECTOR, "#messages li.message")
    return [(item.get_attribute("data-text") or "", item.get_attribute("data-backend") or "")
            for item in items]


def backend_cell(driver: WebDriver, demo_name: str, column: str) -> str:
    cells = driver.find_elements(By.CSS_SELECTOR, f'tr[data-demo="{demo_name}"] td.{column}')
    return cells[0].text if cells else ""


def test_rooms_share_a_backend_fail_over_and_come_back_with_a_live_dashboard(demo, browser, screenshots):
    tabs = Tabs(browser)
    tabs.open("dashboard", demo.dashboard_url)
    wait(browser, lambda: int(body(browser, "updates")) >= 1, "the dashboard's first event")
    assert text(browser, "connections") == "0"

    # Two tabs in one room share its backend, and each sees what both say.
    alpha = join(tabs, "alpha-1", demo.page_url + "?room=alpha")
    assert join(tabs, "alpha-2", demo.page_url + "?room=alpha") == alpha
    say(tabs.use("alpha-2"), "hello from the second tab")
    say(tabs.use("alpha-1"), "hello from the first tab")
    expected = [("hello from the second tab", alpha), ("hello from the first tab", alpha)]
    for name in ("alpha-1", "alpha-2"):
        driver = tabs.use(name)
        wait(driver, lambda: messages(driver) == expected, f"{name} shows both messages")
    own = tabs.driver.find_element(By.CSS_SELECTOR, "#messages li.message[data-rtt]")
    rtt = own.get_attribute("data-rtt")
    assert rtt is not None and float(rtt) >= 0

    # Another room, on a backend of its own choosing; the dashboard counts three connections.
    beta = join(tabs, "beta", demo.page_url + "?room=beta")
    driver = tabs.use("dashboard")
    wait(driver, lambda: text(driver, "connections") == "3", "the dashboard counts three connections")
    wait(driver, lambda: backend_cell(driver, beta, "health") == "up", "beta's backend shows up")

    # Messages show up live as a rate.
    driver = tabs.use("beta")
    for i in range(5):
        say(driver, f"beta message {i}")
    wait(driver, lambda: len(messages(driver)) == 5, "beta shows its five messages")
    driver = tabs.use("dashboard")
    wait(driver, lambda: text(driver, "messages-rate") != "0 / 0", "the dashboard shows messages/s")

    # Stop beta's backend from the dashboard: the room gets 1014 and fails over to another backend.
    click(driver, f'tr[data-demo="{beta}"] button.demo-stop')
    wait(driver, lambda: backend_cell(driver, beta, "health") in ("down", "ejected"), "health turns down")
    driver = tabs.use("beta")
    wait(driver, lambda: body(driver, "close-code") == "1014", "beta shows the close code 1014")
    assert "1014 (bad gateway)" in text(driver, "close-code")
    wait(driver, lambda: body(driver, "state") == "open" and body(driver, "backend") not in ("", beta),
         "beta reconnects to another backend")
    moved_to = body(driver, "backend")
    log = [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#events li")]
    assert any(re.search(r"closed 1014 bad gateway; reconnecting in \d+\.\d\d s", line) for line in log), log
    driver = tabs.use("dashboard")
    wait(driver, lambda: backend_cell(driver, beta, "active") == "0", "the stopped backend holds nothing")
    wait(driver, lambda: "backend lost, 1014" in text(driver, "closes"), "the dashboard lists the 1014s")

    # Start it again: health comes back, and a rebalance (1012) brings the room home.
    click(driver, f'tr[data-demo="{beta}"] button.demo-start')
    wait(driver, lambda: backend_cell(driver, beta, "health") == "up", "health turns up again")
    driver = tabs.use("beta")
    wait(driver, lambda: body(driver, "close-code") == "1012" and body(driver, "state") == "open"
         and body(driver, "backend") == beta, f"beta moves back from {moved_to} to {beta}")
    say(driver, "back home")
    wait(driver, lambda: messages(driver)[-1:] == [("back home", beta)], "beta's backend answers again")
    browser.save_screenshot(str(screenshots / "demo-chat.png"))
    driver = tabs.use("dashboard")
    wait(driver, lambda: backend_cell(driver, beta, "active") != "0", "the dashboard sees beta back")
    wait(driver, lambda: "1012" in text(driver, "closes"), "the dashboard lists the rebalance")
    wait(driver, lambda: text(driver, "connections") == "3", "the dashboard counts all three again")
    wait(driver, lambda: re.fullmatch(r"\d+\.\d\d ms / \d+\.\d\d ms", text(driver, "rtt")),
         "the dashboard shows heartbeat round trips")
    browser.save_screenshot(str(screenshots / "dashboard.png"))
    for name in ("demo-chat.png", "dashboard.png"):
        assert (screenshots / name).stat().st_size > 10_000


# -- WebSockets over HTTP/2 (RFC 8441) -------------------------------------------------------

H2_PAGE = """<!doctype html>
<title>h2</title>
<script>
// Several WebSockets to this page's origin: Chromium opens them as streams of the HTTP/2
// connection it loaded the page on, since the gateway advertised extended CONNECT.
const count = 3;
const echoed = [];
for (let i = 0; i < count; i++) {
  const ws = new WebSocket(`wss://${location.host}/`);
  ws.onopen = () => ws.send(`hello ${i}`);
  ws.onmessage = (event) => {
    echoed.push(event.data);
    document.body.dataset.echoed = echoed.slice().sort().join(",");
    ws.close(1000, "done");
  };
  ws.onclose = (event) => {
    document.body.dataset.closed = String(Number(document.body.dataset.closed || 0) + 1);
  };
}
</script>
<body data-echoed="" data-closed="0">h2</body>
"""


@pytest.fixture
def tls_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    """Headless Chromium that accepts the test certificate (the gateway's, from trustme)."""
    yield from chromium(tmp_path, monkeypatch, "--ignore-certificate-errors")


async def test_chromium_opens_its_websockets_as_streams_of_the_page_s_http2_connection(
    tls_browser, start_gateway_object, ws_backend, tmp_path
):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(H2_PAGE)
    leaf = trustme.CA().issue_cert("127.0.0.1")
    cert, key = tmp_path / "gateway.crt", tmp_path / "gateway.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    config = gateway_config([ws_backend.url], route={"static": str(site)})
    config["listeners"][0].update(tls={"cert": str(cert), "key": str(key)}, http2=True)
    gateway = await start_gateway_object(config)
    port = gateway.addresses[0][1]

    lines: list[dict[str, object]] = []
    three_closed = asyncio.Event()

    class Access(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.access)  # type: ignore[attr-defined]
            if sum(line["status"] == 101 for line in lines) == 3:
                three_closed.set()

    access_logger = logging.getLogger("wsgate.access")
    handler, level = Access(logging.INFO), access_logger.level
    access_logger.setLevel(logging.INFO)
    access_logger.addHandler(handler)
    try:
        def browse() -> tuple[str, str]:
            tls_browser.get(f"https://127.0.0.1:{port}/")
            wait(tls_browser, lambda: body(tls_browser, "closed") == "3", "the three WebSockets close")
            protocol = tls_browser.execute_script(
                "return performance.getEntriesByType('navigation')[0].nextHopProtocol"
            )
            return body(tls_browser, "echoed"), protocol

        echoed, page_protocol = await asyncio.to_thread(browse)
        assert echoed == "hello 0,hello 1,hello 2"
        assert page_protocol == "h2"  # the page itself came over HTTP/2
        async with asyncio.timeout(STEP):
            await three_closed.wait()
    finally:
        access_logger.removeHandler(handler)
        access_logger.setLevel(level)
    upgraded = [line for line in lines if line["status"] == 101]
    assert [line["protocol"] for line in upgraded] == ["h2"] * 3, lines
    assert all(line["close_code"] == 1000 for line in upgraded), upgraded
    value = gateway.registry.get_sample_value
    assert value("wsgate_connections_total", {"route": "test", "outcome": "upgraded", "protocol": "h2"}) == 3
    assert value("wsgate_connections_total",
                 {"route": "test", "outcome": "upgraded", "protocol": "http/1.1"}) is None
    assert ws_backend.connections == 3

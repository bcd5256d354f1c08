"""The status page in a real headless Chromium (Debian's), served by a coordinator that runs a
real federation over Mosquitto: it loads without console errors, its numbers are the numbers of
``fedprune-coordinator status`` and ``/metrics``, it refreshes by itself, and it fits a phone.

Set FEDPRUNE_SCREENSHOT=<path> to keep the screenshot (the README's picture is made that way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from fedprune.coordinator.lab.localfed import BIN, LocalFederation
from tests.integration.mosquitto import MosquittoBroker

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling Google's hosts, which this
# sandbox refuses; --no-sandbox because the tests run as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        message = "chromium is not installed (scripts/bootstrap.sh --test-tools)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must run the browser test, not skip it")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def metric(text: str, name: str, **labels: str) -> float | None:
    rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^fedprune_{name}{{{re.escape(rendered)}}} (\S+)$" if labels else rf"^fedprune_{name} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else None


def field(page, name: str, scope: str = "") -> str:
    return page.locator(f'{scope} [data-field="{name}"]'.strip()).first.inner_text().strip()


def test_the_status_page_shows_a_live_federation_as_status_and_metrics_do(
        mosquitto: MosquittoBroker, browser, tmp_path: Path) -> None:
    access = mosquitto.access()
    fed = LocalFederation(root=tmp_path, broker=access, devices=tuple(d.username for d in mosquitto.devices), rounds=5000,
                          federation=mosquitto.federation, noisy=(mosquitto.devices[2].username,), noise_rate=0.8,
                          settings={"broker": {"username": mosquitto.coordinator.username},
                                    "rounds": {"deadline_s": 20.0}, "export": {"every_rounds": 2}})
    fed.prepare()
    fed.start()
    agents = [fed.processes[d.username] for d in mosquitto.devices]
    try:
        fed.wait_for_round(3, timeout=180)
        deadline = time.monotonic() + 30  # a heartbeat after the release reports its version
        while not all("event=release_installed version=1 " in fed.log(d.username) for d in mosquitto.devices):
            assert time.monotonic() < deadline, "release 1 was not installed"
            time.sleep(0.2)
        time.sleep(6)  # one more heartbeat (5 s) carries the installed release
        for agent in agents:  # freeze the federation so that page, status and /metrics see one moment
            agent.send_signal(signal.SIGSTOP)
        time.sleep(2.5)  # a round in flight closes or waits; the view is rebuilt every second

        errors: list[str] = []
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        url = fed.status_url()
        assert page.goto(url).status == 200
        document = json.loads(urllib.request.urlopen(url + "status.json", timeout=5).read())
        metrics = fed.metrics_text()
        status = subprocess.run([str(BIN / "fedprune-coordinator"), "status", "--config", str(fed.config_path),
                                 "--json"], capture_output=True, text=True, check=True)
        offline_view = json.loads(status.stdout)

        completed = int(field(page, "completed_rounds"))
        assert completed >= 3
        assert completed == document["completed_rounds"] == offline_view["completed_rounds"]
        assert completed == metric(metrics, "rounds_completed_total")
        assert float(field(page, "last_score")) == pytest.approx(metric(metrics, "global_score"), abs=5e-5)
        assert metric(metrics, "global_score") == pytest.approx(metric(metrics, "global_accuracy"))  # classification
        assert int(field(page, "online")) == metric(metrics, "devices_online") == 3
        assert int(field(page, "enrolled")) == metric(metrics, "devices_enrolled") == 3
        by_device = {d["device"]: d for d in offline_view["devices"]}
        for device in mosquitto.devices:
            row = f'tr[data-device="{device.username}"]'
            expected = by_device[device.username]
            assert int(field(page, "rounds", row)) == expected["rounds"] > 0
            assert field(page, "quality", row) == f"{expected['quality']:.3f}"
            assert field(page, "importance", row) == f"{metric(metrics, 'device_importance', device=device.username):.3f}"
            assert page.locator(f'{row} [data-field="bytes_sent"]').get_attribute("title") == f"{expected['bytes_sent']} bytes"
            assert field(page, "release", row) != "–"  # reported in its heartbeat
        assert len(page.locator("svg polyline").all()) >= 3  # accuracy, loss, bytes
        noisy = mosquitto.devices[2].username
        assert by_device[noisy]["quality"] < min(by_device[d.username]["quality"] for d in mosquitto.devices[:2])

        shot = tmp_path / "status.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000
        if os.environ.get("FEDPRUNE_SCREENSHOT"):
            shutil.copy(shot, os.environ["FEDPRUNE_SCREENSHOT"])

        phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
        phone.on("pageerror", lambda e: errors.append(f"phone page error: {e}"))
        phone.goto(url)
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # wide tables scroll in their box
        phone.close()

        for agent in agents:
            agent.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 90  # the page refreshes itself, without a reload
        while int(page.locator("[data-field=completed_rounds]").text_content()) <= completed:
            assert time.monotonic() < deadline, "the page did not refresh itself"
            time.sleep(0.5)
        assert errors == []
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGCONT)
        fed.stop_all()

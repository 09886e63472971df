"""``orchestrator flower`` during a real drain: through Flower's HTTP API, its /metrics, and
the Hosts page as headless Chromium renders it."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nova_app import operations
from nova_app.app import orch
from orchestrator.local.embedded import free_port
from orchestrator.local.fleet import Fleet, wait_for
from tests.helpers import Gate, resize_vm1_until, wait_draining

pytestmark = pytest.mark.shutdown

#: Set to a directory (docs/screenshots) to keep the screenshots this test takes.
SCREENSHOTS = os.environ.get("ORCHESTRATOR_SCREENSHOTS")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class FlowerProcess:
    def __init__(self, log: Path, unauthenticated_api: bool, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        environ = {k: v for k, v in os.environ.items() if k != "FLOWER_UNAUTHENTICATED_API"}
        if unauthenticated_api:
            environ["FLOWER_UNAUTHENTICATED_API"] = "true"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.ops.cli", "flower", f"--port={self.port}",
                 "--address=127.0.0.1", *args],
                env={**environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            )

    def get(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.base + path)
        if auth is not None:
            token = base64.b64encode(":".join(auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def timed_get(self, path: str, auth: tuple[str, str] | None = None
                  ) -> tuple[int, str, float]:
        started = time.monotonic()
        status, body = self.get(path, auth)
        return status, body, time.monotonic() - started

    def hosts(self) -> dict[str, dict]:
        status, body = self.get("/api/orchestrator/hosts")
        assert status == 200, body
        return {h["host"]: h for h in json.loads(body)["hosts"]}

    def wait_up(self) -> None:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower exited: {self.log_path.read_text()[-3000:]}")
            try:
                return self.get("/healthcheck")[0] == 200
            except OSError:
                return False

        wait_for(answers, 30, "flower to answer")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)


def render(url: str, name: str) -> str:
    """The page's DOM once its script ran; with ORCHESTRATOR_SCREENSHOTS, a screenshot of it
    there too (``name``.png)."""
    browser = chromium()
    assert browser is not None
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=1500,620", "--virtual-time-budget=2500"]
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    if SCREENSHOTS:
        shot = Path(SCREENSHOTS) / f"{name}.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*args, f"--screenshot={shot}", url], capture_output=True, timeout=60,
                       check=True)
        assert shot.stat().st_size > 10_000, f"{shot} looks empty"
    return dom


def test_flower_shows_a_drain(fleet: Fleet, tmp_path: Path) -> None:
    if chromium() is None:
        pytest.skip("no chromium: apt-get install chromium (.ci/run installs it)")
    # resize_instance is held at its start while the pages are read and rendered (the drain
    # waits for it); for screenshots it then lasts long enough to draw as a bar.
    gate = Gate(tmp_path / "gate")
    env = {**gate.env,
           "ORCHESTRATOR_STEP_DELAYS": f"resize_instance={20 if SCREENSHOTS else 1}"}
    fleet.start("compute1", env=env)
    dest = fleet.start("compute2", graceful_timeout=60, env=env)
    flower = FlowerProcess(tmp_path / "flower.log", unauthenticated_api=True)
    try:
        flower.wait_up()
        before = flower.hosts()
        assert before["compute2"]["state"] == "up" and before["compute2"]["drains"] == []

        booted, resize = resize_vm1_until("resize_instance", gate=gate)
        dest.signal(signal.SIGTERM)
        wait_draining("compute2")
        late = operations.boot("vm2", "compute2")  # waits in compute2 while it drains

        wait_for(lambda: flower.hosts()["compute2"]["queued"]["compute2"] == 1, 10,
                 "the boot to wait in compute2")
        host = flower.hosts()["compute2"]
        assert host["state"] == "draining"
        (drain,) = host["drains"]
        assert 45 < drain["deadline_in"] <= 60
        assert [resize.id in w for w in drain["waiting_for"]["operations"]] == [True]
        assert host["operations_in_flight"] == 2  # the resize, and the boot waiting for it

        status, metrics = flower.get("/metrics")
        assert status == 200
        assert 'orchestrator_host_state{host="compute2",state="draining"} 1.0' in metrics
        assert 'orchestrator_queue_messages{host="compute2",kind="main",queue="compute2"} 1.0' \
            in metrics
        assert "flower_events_total" in metrics or "# TYPE flower_" in metrics, \
            "Flower's own metrics are still there"

        status, workers_page = flower.get("/workers")
        assert status == 200 and 'href="/hosts"' in workers_page, "Hosts is in Flower's navbar"
        dom = render(f"{flower.base}/hosts", "flower-hosts-draining")
        row = dom.split('data-host="compute2"', 1)[1].split("</tr>", 1)[0]
        assert 'data-state="draining"' in row and " s left" in row
        assert resize.id in row and "resize_instance@compute1" in row, row
        assert "compute1-alt" not in row
        dom = render(f"{flower.base}/workers", "flower-workers-draining")
        row = dom.split(">compute2@", 1)[1].split("</tr>", 1)[0]
        assert 'data-orchestrator-state="draining"' in row and " s left" in row, row

        gate.release()
        assert dest.wait(timeout=60) == 0, dest.log()
        # The page's read is renewed every couple of seconds: the exit shows within them.
        gone = wait_for(lambda: (h := flower.hosts()["compute2"])["state"] == "down" and h,
                        10, "compute2 shown down")
        assert gone["drains"] == []
        assert gone["last_drain"]["outcome"] == "done"
        assert gone["queued"]["compute2"] == 1, "a down host's waiting work stays visible"
        dom = render(f"{flower.base}/hosts", "flower-hosts-gone")
        row = dom.split('data-host="compute2"', 1)[1].split("</tr>", 1)[0]
        assert "down (worker gone)" in row and "last: done" in row
        dom = render(f"{flower.base}/workers", "flower-workers-exited")
        row = dom.split(">compute2@", 1)[1].split("</tr>", 1)[0]
        assert 'data-orchestrator-state="down"' in row and "Exited" in row, row

        fleet.start("compute2")
        wait_for(lambda: operations.orch.operation(late.id)["status"] == "completed", 30,
                 "the waiting boot to run")
        assert operations.orch.operation(booted)["status"] == "completed"
        check_operations_pages(flower, resize.id, late.id)
    finally:
        gate.release()
        assert flower.stop() in (0, -signal.SIGTERM), flower.log_path.read_text()[-2000:]


def check_operations_pages(flower: FlowerProcess, resize: str, late: str) -> None:
    """The Operations page and one operation's timeline, after the drain of compute2 (the
    resize's last steps ran from compute2-alt while it drained; the boot sent meanwhile
    waited in compute2 for the restart)."""
    status, body = flower.get("/api/orchestrator/operations?host=compute2")
    assert status == 200, body
    listed = json.loads(body)
    assert {resize, late} <= {op["operation"] for op in listed["operations"]}
    status, body = flower.get(f"/api/orchestrator/operations/{resize}")
    assert status == 200, body
    data = json.loads(body)
    kinds = [(e["kind"], e["host"]) for e in data["timeline"]]
    assert ("drain-started", "compute2") in kinds and ("drain-ended", "compute2") in kinds
    assert kinds[0][0] == "submitted" and ("ended", None) in kinds
    lanes = {lane["host"]: lane for lane in data["lanes"]["hosts"]}
    assert [d["outcome"] for d in lanes["compute2"]["drains"]] == ["done"]
    assert "alt" in {b["queue_kind"] for b in lanes["compute2"]["bars"]}, lanes["compute2"]
    status, body = flower.get(f"/api/orchestrator/operations/{resize[:8]}")
    assert status == 200 and json.loads(body)["operation"] == resize, "a unique prefix"
    status, body = flower.get("/api/orchestrator/operations/0000dead")
    assert status == 404 and "unknown operation" in json.loads(body)["error"]

    dom = render(f"{flower.base}/operations?host=compute2", "flower-operations")
    row = dom.split(f'data-operation="{resize}"', 1)[1].split("</tr>", 1)[0]
    assert 'data-status="completed"' in row and f'href="/operations/{resize}"' in row, row
    dom = render(f"{flower.base}/operations/{resize}", "flower-operation-timeline")
    lane = dom.split('data-host="compute2"', 1)[1].split('data-host="', 1)[0]
    assert "orch-drain" in lane and 'data-queue-kind="alt"' in lane, lane
    assert 'href="/hosts?q=compute2"' in dom, "links to the Hosts page"
    assert 'data-kind="drain-started"' in dom and 'data-kind="ended"' in dom
    dom = render(f"{flower.base}/hosts", "flower-hosts-restarted")
    assert 'href="/operations?status=in-flight&amp;host=compute2"' in dom or \
        'href="/operations?status=in-flight&host=compute2"' in dom, "links to the Operations page"


def test_flower_api_needs_auth_or_the_unauthenticated_flag(fleet: Fleet, tmp_path: Path) -> None:
    """Flower's own rule applies to the Hosts API; the page stays reachable in a browser."""
    fleet.start("compute1")
    flower = FlowerProcess(tmp_path / "flower.log", unauthenticated_api=False)
    try:
        flower.wait_up()
        status, body = flower.get("/api/orchestrator/hosts")
        assert status == 401 and "FLOWER_UNAUTHENTICATED_API" in body
        status, body = flower.get("/hosts?json=1")
        assert status == 200 and json.loads(body)["hosts"][0]["host"] == "compute1"
    finally:
        flower.stop()


def test_flower_shows_a_ledger_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger's PostgreSQL stopped under a running worker and Flower: the Hosts page
    says since when the ledger is unreachable and lists the workers answering over the
    broker (no fleet of down hosts); /metrics has each worker's view of the ledger."""
    from orchestrator.testing import pgserver
    from tests.conftest import running_fleet

    if chromium() is None or pgserver.available() is not None:
        pytest.skip("needs chromium and a private PostgreSQL")
    pg = pgserver.PrivatePostgres().init()
    try:
        pg.start()
        pg.wait_answering()
        with running_fleet(tmp_path, ORCHESTRATOR_DB_URL=pg.url) as fleet:
            monkeypatch.setenv("ORCHESTRATOR_DB_URL", pg.url)
            fleet.start("compute1")
            flower = FlowerProcess(tmp_path / "flower.log", unauthenticated_api=True)
            try:
                flower.wait_up()
                assert flower.hosts()["compute1"]["state"] == "up"
                pg.stop("fast")

                def outage() -> dict | None:
                    status, body = flower.get("/api/orchestrator/hosts")
                    data = json.loads(body)
                    workers = data.get("workers") or []
                    return data if status == 200 and not data["ledger"]["up"] and workers \
                        and workers[0]["ledger"]["unreachable_since"] else None

                data = wait_for(outage, 30, "Flower and compute1 to see the ledger down")
                assert data["hosts"] == [] and data["ledger"]["unreachable_since"]
                (worker,) = data["workers"]
                assert worker["host"] == "compute1" and worker["state"] == "up"
                line = ('orchestrator_ledger_up{host="compute1",'
                        f'worker="{worker["nodename"]}"}} 0.0')

                def scraped() -> str | None:
                    status, metrics = flower.get("/metrics")
                    return metrics if status == 200 and line in metrics else None

                metrics = wait_for(scraped, 15, "compute1's view of the ledger on /metrics")
                assert "orchestrator_ledger_reachable 0.0" in metrics
                dom = render(f"{flower.base}/hosts", "flower-hosts-ledger-unreachable")
                assert "Ledger unreachable since" in dom
                row = dom.split('data-host="compute1"', 1)[1].split("</tr>", 1)[0]
                assert "answers over the broker; ledger unreachable since" in row, row
                assert 'data-state="down"' not in dom  # no host called down

                pg.start()
                wait_for(lambda: flower.get("/api/orchestrator/hosts")[0] == 200
                         and json.loads(flower.get("/api/orchestrator/hosts")[1])
                         .get("hosts"), 30, "the hosts back")
                assert flower.hosts()["compute1"]["state"] == "up"
            finally:
                flower.stop()
    finally:
        pg.destroy()


AUTH = ("prometheus", "s3cret")
#: asyncio's debug mode logs every callback of the loop that ran 0.1 s or more.
SLOW_CALLBACK = re.compile(r"Executing .* took (\d+\.\d+) seconds")


def register_gone_hosts(count: int, digits: int = 2) -> None:
    """``count`` hosts whose worker exited (its row says down), as a fleet leaves them:
    ``gone00``, ``gone01``... (``digits`` wide)."""
    for i in range(count):
        host = f"gone{i:0{digits}d}"
        orch.registry.register(f"{host}@elsewhere", host, consumes_main=True,
                               consumes_alt=True, pid=1)
        orch.registry.set_state(f"{host}@elsewhere", "down")


def test_flower_basic_auth_covers_metrics_and_the_hosts_json(fleet: Fleet,
                                                             tmp_path: Path) -> None:
    """With --basic-auth, /metrics (Flower's and ours) and the Hosts JSON need credentials,
    as Flower's pages do, even with FLOWER_UNAUTHENTICATED_API=true (which, for Flower's
    API too, opens nothing once auth is on); Prometheus scrapes with them."""
    fleet.start("compute1")
    flower = FlowerProcess(tmp_path / "flower.log", unauthenticated_api=True,
                           args=(f"--basic-auth={':'.join(AUTH)}",))
    try:
        flower.wait_up()  # /healthcheck stays open, as in Flower
        for path in ("/metrics", "/hosts?json=1", "/api/orchestrator/hosts", "/hosts"):
            assert flower.get(path)[0] == 401, path
            assert flower.get(path, (AUTH[0], "wrong"))[0] == 401, path
        status, metrics = flower.get("/metrics", AUTH)
        assert status == 200
        assert 'orchestrator_host_state{host="compute1",state="up"} 1.0' in metrics
        assert "# TYPE flower_" in metrics, "Flower's own metrics are still there"
        status, body = flower.get("/hosts?json=1", AUTH)
        assert status == 200 and json.loads(body)["hosts"][0]["host"] == "compute1"
        assert flower.get("/api/orchestrator/hosts", AUTH)[0] == 200
    finally:
        flower.stop()


def test_scrapes_never_hold_flower_up(fleet: Fleet, tmp_path: Path) -> None:
    """50 hosts known (one running, 49 gone), three scrapes and the Hosts JSON at once: no
    callback of Flower's loop runs for as long as a read takes (asyncio's debug mode names
    every one of 0.1 s or more: none reaches 0.5 s), /healthcheck answers meanwhile, and
    once a read is kept a scrape answers in under 100 ms."""
    fleet.start("compute1")
    register_gone_hosts(49)
    flower = FlowerProcess(tmp_path / "flower.log", unauthenticated_api=False,
                           args=(f"--basic-auth={':'.join(AUTH)}",),
                           env={"PYTHONASYNCIODEBUG": "1"})
    try:
        flower.wait_up()
        started_at = flower.log_path.stat().st_size
        with ThreadPoolExecutor(4) as pool:
            scrapes = [pool.submit(flower.timed_get, "/metrics", AUTH) for _ in range(3)]
            page = pool.submit(flower.timed_get, "/hosts?json=1", AUTH)
            health = flower.timed_get("/healthcheck")
            cold = [scrape.result() for scrape in scrapes]
        assert page.result()[0] == 200 and len(json.loads(page.result()[1])["hosts"]) == 50
        assert [status for status, _, _ in cold] == [200] * 3
        states = re.findall(r'^orchestrator_host_state\{host="([^"]+)",state="up"\}',
                            cold[0][1], re.M)
        assert len(states) == 50
        log = flower.log_path.read_bytes()[started_at:].decode(errors="replace")
        held = [float(t) for t in SLOW_CALLBACK.findall(log)]
        assert all(t < 0.5 for t in held), f"Flower's loop held {held} s:\n{log[-3000:]}"
        assert health[0] == 200 and health[2] < max(t for _, _, t in cold) / 2, \
            f"/healthcheck took {health[2]:.3f} s during scrapes of " \
            f"{', '.join(f'{t:.3f}' for _, _, t in cold)} s"
        warm = sorted(flower.timed_get("/metrics", AUTH)[2] for _ in range(5))
        print(f"\n50 hosts: cold scrapes {[round(t, 3) for _, _, t in cold]} s, /healthcheck "
              f"meanwhile {health[2]:.3f} s, warm scrapes {[round(t, 3) for t in warm]} s")
        assert warm[len(warm) // 2] < min(t for _, _, t in cold) / 2, \
            f"warm scrapes took {warm} s, cold {[t for _, _, t in cold]} s"
    finally:
        flower.stop()


def test_the_hosts_tab_pages_and_searches(fleet: Fleet, tmp_path: Path) -> None:
    """121 hosts (compute1 running, 120 gone): the Hosts tab shows 50 a page and how many
    match, searched by a glob or a part of the name and by state; the JSON answers the same
    query (``?q=&state=&page=``). In Chromium, the page with a search typed in."""
    fleet.start("compute1")
    register_gone_hosts(120, digits=3)
    flower = FlowerProcess(tmp_path / "flower.log", unauthenticated_api=True)
    try:
        flower.wait_up()

        def page(query: str) -> dict:
            status, body = flower.get(f"/api/orchestrator/hosts?{query}")
            assert status == 200, body
            return json.loads(body)

        first = page("")
        assert (first["total"], first["offset"], len(first["hosts"])) == (121, 0, 50)
        assert first["hosts"][0]["host"] == "compute1"
        third = page("page=3")
        assert (third["offset"], [h["host"] for h in third["hosts"]][:2]) == \
            (100, ["gone099", "gone100"])
        assert len(third["hosts"]) == 21
        assert page("page=9")["hosts"] == [] and page("page=x")["offset"] == 0
        globbed = page("q=gone01*")
        assert globbed["total"] == 10 and globbed["hosts"][0]["host"] == "gone010"
        assert page("q=one11")["total"] == 10, "a part of the name"
        up = page("state=up")
        assert [h["host"] for h in up["hosts"]] == ["compute1"] and up["total"] == 1
        assert page("q=compute*&state=down")["total"] == 0
        if chromium() is not None:
            # "gone1": gone100-gone119 (a part of the name: not gone010).
            dom = render(f"{flower.base}/hosts?q=gone1&state=down", "flower-hosts-search")
            assert 'data-host="gone110"' in dom and 'data-host="gone010"' not in dom, dom[-2000:]
            assert "hosts 1\u201320 of 20" in dom, dom[-3000:]
            dom = render(f"{flower.base}/hosts?page=3", "flower-hosts-page-3")
            assert "hosts 101\u2013121 of 121" in dom and 'data-host="gone120"' not in dom
    finally:
        flower.stop()

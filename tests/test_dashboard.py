"""The dashboard: its figures, its HTTP server, and the page in headless Chromium after a real tiny night."""

import json
import os
import shutil
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.nightly import nightly
from t2v.dashboard import Dashboard, make_server, summary
from t2v.pipeline import CLIP, PIPELINE
from t2v.runlog import RunLog, sqlite_url
from t2v.store import Folder, Store

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path("/tmp/t2v-dashboard.png")
SCREENSHOT_FAILED = Path("/tmp/t2v-dashboard-failed.png")
SCREENSHOT_INTERRUPTED = Path("/tmp/t2v-dashboard-interrupted.png")
SCREENSHOT_SKIPPED = Path("/tmp/t2v-dashboard-skipped.png")


def require(available: bool, why: str) -> None:
    """Skip a test whose tool is missing on a developer's machine; in CI (CI=true) fail instead."""
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why}; CI must have it (see .ci/run)")
    pytest.skip(why)


def _row(template: str, stage: str, status: str = "ok", **figures: object) -> dict:
    row = {
        "template": template,
        "stage": stage,
        "status": status,
        "plan": None,
        "wall_s": 1.0,
        "peak_reserved_gib": None,
        "peak_nvml_gib": None,
        "peak_rss_gib": None,
        "output_key": None,
        "error": None,
    }
    return row | figures


def _run(stages: list[dict], status: str = "failed", **fields: object) -> dict:
    run = {
        "id": "r1",
        "kind": "nightly",
        "status": status,
        "model": "tiny",
        "catalogue": None,
        "parent_run_id": None,
        "host": "h",
        "started": "2026-11-25T02:00:00+00:00",
        "finished": "2026-11-25T02:10:00+00:00",
        "stages": stages,
    }
    return run | fields


def test_night_adds_attempts_keeps_peaks_and_lists_only_unrecovered_failures():
    run = _run(
        [
            _row("fox", "encode", peak_rss_gib=0.5),
            # An out-of-memory attempt, then the leaner plan that worked.
            _row("fox", "diffuse", "failed", plan="gpu", wall_s=2.0, peak_reserved_gib=7.5, error="OOM"),
            _row("fox", "diffuse", plan="offload", wall_s=3.0, peak_reserved_gib=5.0, peak_nvml_gib=9.0),
            _row("fox", "decode", peak_nvml_gib=1.5),  # no torch counter: NVML is the fallback
            _row("fox", "finish", output_key="a" * 32),
            _row("sea", "encode"),
            _row("sea", "diffuse", "failed", error="RuntimeError: boom\nsecond line"),
        ]
    )

    night = summary.night(run)

    assert (night["jobs_ok"], night["jobs_failed"], night["wall_s"]) == (1, 1, 600.0)
    fox, sea = night["jobs"]
    assert (fox["status"], fox["clip_key"], sea["status"], sea["clip_key"]) == (
        "ok",
        "a" * 32,
        "failed",
        None,
    )
    diffuse = fox["stages"]["diffuse"]
    assert (diffuse["status"], diffuse["attempts"], diffuse["wall_s"], diffuse["peak_vram_gib"]) == (
        "ok",
        2,
        5.0,
        7.5,
    )
    assert fox["stages"]["decode"]["peak_vram_gib"] == 1.5
    assert night["failures"] == [
        {
            "template": "sea",
            "stage": "diffuse",
            "status": "failed",
            "attempts": 1,
            "error": "RuntimeError: boom\nsecond line",
        }
    ]
    assert night["rerun_command"] == "t2v rerun r1"
    assert summary.night(run | {"status": "running", "finished": None})["rerun_command"] is None
    table = summary.stage_table(run)
    assert [(r["template"], r["stage"], r["attempts"]) for r in table][:2] == [
        ("fox", "encode", 1),
        ("fox", "diffuse", 2),
    ]
    assert table[-1]["error"] == "RuntimeError: boom"


def test_an_interrupted_night_says_interrupted_and_offers_its_rerun():
    first, second, *_ = (s.name for s in PIPELINE)
    run = _run(
        [
            *(_row("fox", s.name, output_key="a" * 32) for s in PIPELINE),
            # Killed between two stages: no row failed, nor was any left running.
            _row("sea", first),
            _row("owl", first),
            _row("owl", second, "running", wall_s=None),  # closed with the run, not on its own
        ],
        status="interrupted",
    )

    night = summary.night(run)

    assert [j["status"] for j in night["jobs"]] == ["ok", "interrupted", "interrupted"]
    assert (night["jobs_ok"], night["jobs_failed"], night["jobs_interrupted"]) == (1, 0, 2)
    assert night["rerun_command"] == "t2v rerun r1"
    assert [(f["template"], f["stage"], f["status"]) for f in night["failures"]] == [
        ("owl", second, "interrupted")
    ]
    # Killed before any row failed or was closed: still re-runnable.
    bare = _run([_row("sea", first)], status="interrupted")
    assert summary.night(bare)["rerun_command"] == "t2v rerun r1"
    assert summary.nights([bare])[0]["jobs_interrupted"] == 1
    # `t2v rerun` takes nightly runs and re-runs only, and never an ok or running one.
    assert summary.night(bare | {"kind": "generate"})["rerun_command"] is None
    assert summary.night(bare | {"status": "ok"})["rerun_command"] is None
    assert summary.night(bare | {"status": "running", "finished": None})["rerun_command"] is None


def test_a_night_that_skipped_every_stage_says_nothing_was_computed():
    skipped = [_row(t, s.name, "skipped", wall_s=0.0) for t in ("fox", "sea") for s in PIPELINE]
    assert summary.night(_run(skipped, status="ok"))["nothing_computed"] is True
    assert summary.nights([_run(skipped, status="ok")])[0]["nothing_computed"] is True
    computed = skipped[:-1] + [_row("sea", CLIP.name)]
    assert summary.night(_run(computed, status="ok"))["nothing_computed"] is False
    assert summary.night(_run([], status="failed"))["nothing_computed"] is False


def test_trends_are_oldest_first_per_stage_and_only_nightly():
    newer = _run(
        [_row("fox", "diffuse", peak_reserved_gib=4.0, wall_s=10.0)], id="b", started="2026-11-26T02:00:00"
    )
    older = _run(
        [_row("fox", "diffuse", peak_reserved_gib=6.0), _row("sea", "diffuse", peak_reserved_gib=2.0)],
        id="a",
        started="2026-11-25T02:00:00",
    )
    one_off = _run([_row("x", "encode")], id="c", kind="generate", started="2026-11-27T02:00:00")

    trends = summary.trends([newer, one_off, older])

    assert trends["runs"] == ["a", "b"]
    assert trends["peak_vram_gib"]["diffuse"] == [6.0, 4.0]
    assert trends["wall_s"]["diffuse"] == [2.0, 10.0]
    assert trends["peak_vram_gib"]["encode"] == [None, None]


# --- the HTTP server -------------------------------------------------------------------------------


@pytest.fixture
def serve() -> Iterator:
    """Start a dashboard server on a free loopback port; yields a function that returns its base URL."""
    servers = []

    def start(board: Dashboard) -> str:
        server = make_server(board, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        host, port = server.server_address[:2]
        return f"http://{host}:{port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _raw(base: str, path: str, host: str | None) -> tuple[int, bytes]:
    """A GET sent byte for byte, so that the Host header is exactly `host` (None: no Host at all)."""
    address, port = base.removeprefix("http://").rsplit(":", 1)
    lines = [f"GET {path} HTTP/1.1", *([f"Host: {host}"] if host is not None else []), "Connection: close"]
    with socket.create_connection((address, int(port)), timeout=10) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_server_answers_only_requests_addressed_to_it(tmp_path, serve):
    runlog = RunLog(sqlite_url(tmp_path / "runlog.sqlite"))
    store = Store(tmp_path / "store")
    key = "0123456789abcdef0123456789abcdef"
    with store.writing(CLIP, key) as temp:
        temp.write_bytes(b"CLIPBYTES" * 10)
    run_id = runlog.start_run(kind="nightly", model="tiny")
    with runlog.stage(run_id=run_id, job_key="k", template="fox", stage=CLIP.name, model="tiny") as record:
        record.output_key = key
    runlog.finish_run(run_id, status="ok")
    board = Dashboard(runlog=runlog, store=store)
    base = serve(board)
    port = base.rsplit(":", 1)[1]
    routes = (
        "/",
        "/index.html",
        "/static/app.js",
        "/api/nights",
        f"/api/nights/{run_id}",
        f"/clips/{key}.mp4",
    )

    for path in routes:
        for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", f"[::1]:{port}"):
            assert _raw(base, path, host)[0] == 200, (path, host)
        for host in (
            "evil.example",
            f"evil.example:{port}",
            f"127.0.0.1.evil.example:{port}",
            f"localhost.evil.example:{port}",
            f"evil.example:{port}@127.0.0.1",
            f"127.0.0.1:{port}/x",
            "127.0.0.2",  # not the address this server was started on
            "",
            None,
        ):
            status, body = _raw(base, path, host)
            assert status in (403, 421), (path, host)
            assert run_id.encode() not in body and b"CLIPBYTES" not in body and b"<html" not in body

    # The address given with --host counts too (127.0.0.2 is loopback on Linux).
    other = make_server(board, host="127.0.0.2", port=0)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        other_base = f"http://127.0.0.2:{other.server_address[1]}"
        assert _raw(other_base, "/api/nights", "127.0.0.2")[0] == 200
        assert _raw(other_base, "/api/nights", f"127.0.0.2:{other.server_address[1]}")[0] == 200
        assert _raw(other_base, "/api/nights", "localhost")[0] == 200
        assert _raw(other_base, "/api/nights", "evil.example")[0] in (403, 421)
    finally:
        other.shutdown()
        other.server_close()


def test_server_answers_json_clips_in_ranges_and_nothing_outside_the_store(tmp_path, serve):
    runlog = RunLog(sqlite_url(tmp_path / "runlog.sqlite"))
    store = Store(tmp_path / "store")
    key = "0123456789abcdef0123456789abcdef"
    with store.writing(CLIP, key) as temp:
        temp.write_bytes(bytes(range(256)) * 4)
    (tmp_path / "secret.mp4").write_bytes(b"not yours")
    run_id = runlog.start_run(kind="nightly", model="tiny")
    with runlog.stage(run_id=run_id, job_key="k", template="fox", stage=CLIP.name, model="tiny") as record:
        record.output_key = key
    runlog.finish_run(run_id, status="ok")
    base = serve(Dashboard(runlog=runlog, store=store))

    status, _, body = _get(f"{base}/api/nights")
    assert status == 200 and json.loads(body)["nights"][0]["id"] == run_id
    status, _, body = _get(f"{base}/api/nights/{run_id}")
    assert status == 200 and json.loads(body)["jobs"][0]["clip_key"] == key
    assert _get(f"{base}/api/nights/nope")[0] == 404

    status, headers, body = _get(f"{base}/clips/{key}.mp4")
    assert (status, headers["Content-Type"], len(body)) == (200, "video/mp4", 1024)
    status, headers, body = _get(f"{base}/clips/{key}.mp4", Range="bytes=1000-")
    assert (status, headers["Content-Range"], body) == (206, "bytes 1000-1023/1024", bytes(range(232, 256)))
    status, headers, body = _get(f"{base}/clips/{key}.mp4", Range="bytes=-4")
    assert (status, body) == (206, bytes(range(252, 256)))
    assert _get(f"{base}/clips/{key}.mp4", Range="bytes=5000-")[0] == 416

    # A poster is served by its own key with its own type; a key is only ever its own file's.
    poster = "fedcba9876543210fedcba9876543210"
    with store.writing(Folder(CLIP.folder, ".jpg"), poster) as temp:
        temp.write_bytes(b"\xff\xd8JPEG")
    status, headers, body = _get(f"{base}/clips/{poster}.jpg")
    assert (status, headers["Content-Type"], body) == (200, "image/jpeg", b"\xff\xd8JPEG")
    for wrong in (
        f"{key}.jpg",
        f"{poster}.mp4",
        f"{key}.exe",
        f"{key}.mp4.sha256",
        f"{key}.json",
        f"{key}.MP4",
    ):
        assert _get(f"{base}/clips/{wrong}")[0] == 404, wrong

    # Anything that is not a 32-hex store key is refused before a path is built.
    for path in (
        "/clips/../secret.mp4",
        "/clips/%2e%2e%2fsecret.mp4",
        "/clips/..%2F..%2Fsecret.mp4",
        f"/clips/{key.upper()}.mp4",
        "/clips/ffffffffffffffffffffffffffffffff.mp4",
        "/static/../server.py",
        "/static/%2e%2e/server.py",
        "/static/VENDORED.md",
    ):
        status, _, body = _get(base + path)
        assert status == 404, path
        assert b"not yours" not in body and b"import" not in body
    assert _get(f"{base}/static/chart.umd.js")[0] == 200


# --- the page in a browser -------------------------------------------------------------------------


def _fail_a_stage(runlog: RunLog) -> str:
    """A finished run with one failed diffusion, recorded through the run log's own API."""
    run_id = runlog.start_run(kind="nightly", model="tiny")
    with pytest.raises(RuntimeError):
        with runlog.stage(run_id=run_id, job_key="k", template="kite", stage="diffuse", model="tiny"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered <script>")
    runlog.finish_run(run_id, status="failed")
    return run_id


def _interrupt_a_night(runlog: RunLog) -> str:
    """A night killed between two stages: its first stage done, no row failed, the run closed interrupted."""
    run_id = runlog.start_run(kind="nightly", model="tiny")
    with runlog.stage(run_id=run_id, job_key="k2", template="owl", stage=PIPELINE[0].name, model="tiny"):
        pass
    runlog.finish_run(run_id, status="interrupted")
    return run_id


def _check_outputs(page, base: str, data_dir: Path) -> None:
    """The poster is fox's thumbnail and its preview plays on hover; every output is listed, served by
    key with the published file's bytes, and downloads under its published name. sea has its clip only."""
    from datetime import date

    published = data_dir / "outputs" / date.today().isoformat()
    fox, sea = page.locator(".clip[data-template='fox']"), page.locator(".clip[data-template='sea']")
    thumb = fox.locator("img.thumb")
    img = "document.querySelector(\".clip[data-template='fox'] img.thumb\")"
    page.wait_for_function(
        f"() => {img}.complete && {img}.naturalWidth === 96 && {img}.src.endsWith('.jpg')", timeout=20_000
    )
    poster = thumb.get_attribute("src")
    assert fox.locator("video").get_attribute("poster") == poster
    thumb.hover()
    page.wait_for_function(
        f"() => {img}.src.endsWith('.webp') && {img}.complete && {img}.naturalWidth === 64", timeout=20_000
    )
    page.mouse.move(0, 0)
    page.wait_for_function(f"() => {img}.getAttribute('src') === '{poster}'")
    links = fox.locator("ul.outputs a")
    names = ["fox.mp4", "fox.9x16.mp4", "fox.poster.jpg", "fox.preview.webp"]
    assert links.all_inner_texts() == names
    for i, name in enumerate(names):
        href = links.nth(i).get_attribute("href")
        assert links.nth(i).get_attribute("download") == name
        status, _, body = _get(base + href)
        assert status == 200 and body == (published / name).read_bytes(), name
    with page.expect_download() as download:
        links.nth(1).click()
    assert download.value.suggested_filename == "fox.9x16.mp4"
    assert Path(download.value.path()).read_bytes() == (published / "fox.9x16.mp4").read_bytes()
    assert sea.locator("img.thumb").count() == 0
    assert sea.locator("ul.outputs a").all_inner_texts() == ["sea.mp4"]


def _check_first_frame(page, base: str, picture: Path) -> None:
    """fox (an image job) shows the first frame it was given beside its clip: its picture padded into
    the clip's 96x64 frame, served by its store key; sea (text-only) shows none."""
    from io import BytesIO

    from PIL import Image

    from t2v import images

    fox, sea = page.locator(".clip[data-template='fox']"), page.locator(".clip[data-template='sea']")
    img = "document.querySelector(\".clip[data-template='fox'] figure.first-frame img\")"
    page.wait_for_function(
        f"() => {img}.complete && {img}.naturalWidth === 96 && {img}.naturalHeight === 64", timeout=20_000
    )
    frame = fox.locator(".pair > figure.first-frame")
    assert fox.locator(".pair > video").count() == 1  # side by side in one row
    box, video = frame.bounding_box(), fox.locator(".pair > video").bounding_box()
    assert box["x"] + box["width"] <= video["x"] and abs(box["y"] - video["y"]) < 1
    assert frame.locator("figcaption").inner_text() == f"first frame: {picture.name} (96x64, pad)"
    url = frame.locator("img").get_attribute("src")
    assert url.startswith("/first-frames/") and url.endswith(".png")
    status, headers, body = _get(base + url)
    expected = images.fit_picture(images.read_picture(picture), 96, 64, "pad")
    assert (status, headers["Content-Type"]) == (200, "image/png")
    assert Image.open(BytesIO(body)).convert("RGB").tobytes() == expected.tobytes()
    assert expected.getpixel((2, 32)) == images.BARS and expected.getpixel((48, 32)) == (200, 30, 60)
    assert sea.locator("figure.first-frame").count() == 0 and sea.locator(".first-frame-note").count() == 0


def _show(page, base: str, run_id: str) -> None:
    page.goto(f"{base}/#{run_id}")
    page.wait_for_function(
        f"window.t2v.ready && window.t2v.night && window.t2v.night.id === '{run_id}'", timeout=20_000
    )


def test_page_charts_the_night_and_plays_its_clips_in_chromium(tmp_path, data_dir, write_catalogue, serve):
    require(shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists(), f"{CHROMIUM} is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is not installed")
    from PIL import Image

    picture = tmp_path / "fox-card.png"  # a portrait card, padded into fox's landscape frame
    Image.new("RGB", (40, 60), (200, 30, 60)).save(picture)
    catalogue = write_catalogue(
        # fox: every kind of output, from a picture; sea: the clip alone, as every night before them.
        {
            "name": "fox",
            "prompt": "a red fox running through snow",
            "seed": 1,
            "image": picture.name,
            "fit": "pad",
            "outputs": ["native", "9:16"],
            "poster": "middle",
            "preview.width": 64,
        },
        {"name": "sea", "prompt": "waves rolling onto a beach", "seed": 2},
    )
    result = nightly(str(catalogue), "tiny")
    assert result["failed"] == {}
    runlog = RunLog(sqlite_url(data_dir / "runlog.sqlite"))
    run = runlog.run(result["run_id"])
    expected = [(r["template"], r["stage"]) for r in run["stages"]]
    expected.sort(key=lambda ts: (ts[0], [s.name for s in PIPELINE].index(ts[1])))

    # The flow published the same per-stage figures as a Prefect artifact.
    from prefect.artifacts import Artifact

    artifact = Artifact.get("nightly-stages")
    assert artifact is not None and result["run_id"] in (artifact.description or "")
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert {(r["template"], r["stage"]) for r in table} == {(t, s) for t, s in expected}

    failed_id = _fail_a_stage(runlog)
    interrupted_id = _interrupt_a_night(runlog)
    # The same night again: every output is in the store, so every stage is skipped.
    again = nightly(str(catalogue), "tiny")
    assert {r["status"] for r in runlog.run(again["run_id"])["stages"]} == {"skipped"}
    base = serve(Dashboard(runlog=runlog, store=Store(data_dir / "store")))

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            # The page forbids eval by its CSP; Playwright's wait_for_function needs it.
            page = browser.new_page(viewport={"width": 1280, "height": 1100}, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/#{result['run_id']}")
            page.wait_for_function("window.t2v && window.t2v.ready", timeout=20_000)

            # The per-night chart holds this run's figures, read back from the Chart.js object.
            drawn = page.evaluate(
                """() => { const c = window.t2v.charts['night-chart'];
                   return {labels: c.data.labels, data: c.data.datasets.map(d => d.data)}; }"""
            )
            assert page.locator("#night-chart-note").is_hidden()
            assert sorted(drawn["labels"]) == sorted(f"{t} · {s}" for t, s in expected)
            by_label = {f"{r['template']} · {r['stage']}": r for r in run["stages"]}
            for i, label in enumerate(drawn["labels"]):
                row = by_label[label]
                assert drawn["data"][0][i] == pytest.approx(row["wall_s"])
                assert drawn["data"][1][i] == row["peak_reserved_gib"]  # None on a CPU run
                assert drawn["data"][2][i] == pytest.approx(row["peak_rss_gib"])
            trend = page.evaluate(
                """() => { const c = window.t2v.charts['trend-wall'];
                   return c.data.datasets.map(d => [d.label, d.data]); }"""
            )
            diffuse_total = sum(r["wall_s"] for r in run["stages"] if r["stage"] == "diffuse")
            assert dict(trend)["diffuse"][0] == pytest.approx(diffuse_total)

            # Both clips are in the page and play.
            assert page.locator("#clips video").count() == 2
            page.evaluate("() => Promise.all([...document.querySelectorAll('video')].map(v => v.play()))")
            page.wait_for_function(
                "[...document.querySelectorAll('video')].every(v => v.readyState >= 2 && v.currentTime > 0)",
                timeout=20_000,
            )
            page.evaluate("() => document.querySelectorAll('video').forEach(v => v.pause())")
            _check_outputs(page, base, data_dir)
            _check_first_frame(page, base, picture)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # A failed night lists its failure (as text, not markup) and the command that re-runs it.
            _show(page, base, failed_id)
            assert page.locator("#rerun-command").inner_text() == f"t2v rerun {failed_id}"
            assert (
                "illegal memory access was encountered <script>"
                in page.locator("#failures td.error").inner_text()
            )
            assert page.locator("#nights tbody tr").count() == 4
            page.screenshot(path=str(SCREENSHOT_FAILED), full_page=True)

            # An interrupted night, with no failed row, also offers its re-run and says interrupted.
            _show(page, base, interrupted_id)
            assert page.locator("#rerun").is_visible()
            assert page.locator("#rerun-command").inner_text() == f"t2v rerun {interrupted_id}"
            assert "interrupted" in page.locator("#rerun-why").inner_text()
            assert page.locator("#failures").is_hidden()
            meta = page.locator("#night-meta").inner_text()
            assert "0 failed, 1 interrupted" in meta
            row = page.locator(f"#nights tbody tr[data-run='{interrupted_id}'] td").all_inner_texts()
            assert row[2:5] == ["interrupted", "0", "1 interrupted"]
            page.screenshot(path=str(SCREENSHOT_INTERRUPTED), full_page=True)

            # A night that skipped every stage says why its chart is empty instead of drawing zeros.
            _show(page, base, again["run_id"])
            note = page.locator("#night-chart-note")
            assert note.is_visible()
            assert note.inner_text() == "nothing computed: every stage's output was already stored"
            assert page.locator("#night-chart").is_hidden()
            assert page.evaluate("() => 'night-chart' in window.t2v.charts") is False
            assert page.locator("#rerun").is_hidden()
            assert page.locator("#clips video").count() == 2  # its clips are the stored ones
            page.screenshot(path=str(SCREENSHOT_SKIPPED), full_page=True)

            # Back to a computed night: the chart is drawn again and the note is gone.
            _show(page, base, result["run_id"])
            assert page.locator("#night-chart-note").is_hidden()
            assert page.evaluate("() => window.t2v.charts['night-chart'].data.labels.length") == len(expected)
            assert errors == []
        finally:
            browser.close()

    # The picture edited since: the night no longer shows it, says why, and its key serves nothing.
    def fox_of_the_night() -> dict:
        # By name: the night's two encodes start together, so either job may have the first row.
        jobs = json.loads(_get(f"{base}/api/nights/{result['run_id']}")[2])["jobs"]
        return next(job for job in jobs if job["template"] == "fox")

    url = fox_of_the_night()["first_frame"]["url"]
    Image.new("RGB", (40, 60), (0, 90, 200)).save(picture)
    fox = fox_of_the_night()
    assert (fox["template"], fox["first_frame"]) == ("fox", None)
    assert fox["first_frame_note"] == "picture fox-card.png has changed since this night"
    assert _get(base + url)[0] == 404
    for path in (
        f"/first-frames/{'0' * 32}.png",
        f"/first-frames/{url[14:46]}.jpg",
        "/first-frames/../fox-card.png",
    ):
        assert _get(base + path)[0] == 404, path

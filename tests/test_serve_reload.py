"""Reloads without downtime (generator.serving.holder): a reload under traffic drops no request and each answer comes
whole from one version; a version that fails to load, loses a decoder or fails its pin is refused and the old one
keeps serving; the file watch swaps in a new version; `semid serve` itself starts, answers and stops cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from generator.runs.folder import CONFIG_FILE, HYBRID_FILE, IDS_FILE, read_config, write_config
from generator.runs.pinning import combined_digest, run_digests
from generator.runs.recommender import Recommender
from tests.serve_helpers import HISTORIES, app_for, serving

ROOT = Path(__file__).resolve().parents[1]


def test_a_reload_under_traffic_drops_no_request(serve_world: dict[str, Path]) -> None:
    target = {"path": serve_world["v1"]}
    app = app_for(serve_world["v1"], target, max_wait_ms=2)
    want = {}
    for name in ("v1", "v2"):
        rec = Recommender.from_run(serve_world[name])
        want[rec.version] = [r.items.tolist() for r in rec.recommend(HISTORIES, 5, "hybrid", exclude_history=True)]
    v1, v2 = list(want)
    assert v1 != v2 and want[v1] != want[v2]  # the two versions rank differently: the check below can tell them apart

    async def drive() -> tuple[list, dict, float]:
        answers, stop = [], asyncio.Event()
        async with serving(app) as c:
            async def client(i: int) -> None:
                h = HISTORIES[i % len(HISTORIES)]
                while not stop.is_set() and len(answers) < 20_000:  # bounded, also when answers come at once
                    sent = time.monotonic()
                    r = await c.post("/recommend", json={"history": h, "k": 5, "decoder": "hybrid"})
                    answers.append((sent, i % len(HISTORIES), r.status_code, r.json()))
                    await asyncio.sleep(0)  # an answer that never waited must not starve the other tasks

            tasks = [asyncio.create_task(client(i)) for i in range(8)]
            await asyncio.sleep(0.5)
            target["path"] = serve_world["v2"]
            reload = await c.post("/admin/reload")
            swapped = time.monotonic()
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*tasks)
        return answers, reload.json(), swapped

    answers, reload, swapped = asyncio.run(drive())
    assert reload == {"version": v2, "previous": v1}
    assert [a for a in answers if a[2] != 200] == []
    seen = [a[3]["version"] for a in answers]
    assert seen.count(v1) > 0 and seen.count(v2) > 0
    for _, i, _, body in answers:  # each answer whole from the version it names
        assert [r["item_id"] for r in body["items"]] == want[body["version"]][i]
    assert all(body["version"] == v2 for sent, _, _, body in answers if sent > swapped)  # asked after the swap
    assert app.state.metrics.registry.get_sample_value("semid_reloads_total", {"outcome": "done"}) == 1


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / IDS_FILE).write_bytes(b"not an npz file")
    return dst


def test_a_version_that_fails_is_refused_and_the_old_one_serves(serve_world: dict[str, Path], tmp_path: Path) -> None:
    target = {"path": serve_world["v1"]}
    app = app_for(serve_world["v1"], target)
    v1 = app.state.holder.current.version
    with TestClient(app, base_url="http://127.0.0.1") as c, pytest.MonkeyPatch.context() as mp:
        mp.setattr("generator.serving.app._is_loopback", lambda host: True)  # TestClient's client is "testclient"
        target["path"] = _broken_copy(serve_world["v1"], tmp_path / "broken")
        r = c.post("/admin/reload")
        assert r.status_code == 500 and "refused" in r.json()["error"]["message"] and IDS_FILE in r.json()["error"]["message"]
        assert v1 in r.json()["error"]["message"]
        target["path"] = serve_world["v2_no_fusion"]  # loads, but cannot serve the hybrid the running one serves
        r = c.post("/admin/reload")
        assert r.status_code == 409 and "['hybrid']" in r.json()["error"]["message"], r.text
        assert c.get("/readyz").json()["version"] == v1
        assert c.post("/recommend", json={"history": [1, 2], "decoder": "hybrid"}).json()["version"] == v1
        assert c.post("/admin/reload", content=b'{"force": true}').status_code == 422
        target["path"] = shutil.copytree(serve_world["v1"], tmp_path / "no_data")  # loads, but without its dataset
        write_config(target["path"], {**read_config(target["path"]), "data": str(tmp_path / "moved")})
        r = c.post("/admin/reload")
        assert r.status_code == 409 and "without titles and asins" in r.json()["error"]["message"], r.text
        assert c.get("/items/1").json()["title"] is not None and c.get("/readyz").json()["version"] == v1
        # failed: the version did not load, or its files were refused (the lost hybrid, the lost dataset: they were
        # counted as the request's fault); refused: the request's (the body here)
        assert 'semid_reloads_total{outcome="failed"} 3.0' in c.get("/metrics").text
        assert 'semid_reloads_total{outcome="refused"} 1.0' in c.get("/metrics").text
        assert c.post("/admin/reload?force=1").status_code == 422  # a query, an origin: refused too (were not counted)
        assert c.post("/admin/reload", headers={"Origin": "http://a.example"}).status_code == 403
        assert 'semid_reloads_total{outcome="refused"} 3.0' in c.get("/metrics").text
        r = c.post("/admin/reload", content=b"[]")  # (its example was a recommendation's body)
        assert r.status_code == 400 and r.json()["error"]["allowed"] == 'a JSON object such as {"expect_sha256": "<64 hex digits>"}'


def test_a_pinned_service_reloads_only_the_pinned_version(serve_world: dict[str, Path]) -> None:
    target = {"path": serve_world["v1"]}
    app = app_for(serve_world["v1"], target)
    app.state.holder.pinned = True
    with TestClient(app) as c, pytest.MonkeyPatch.context() as mp:
        mp.setattr("generator.serving.app._is_loopback", lambda host: True)
        v1 = app.state.holder.current.version
        assert c.post("/admin/reload").status_code == 409  # a pinned service needs the new digest
        target["path"] = app.state.holder.run_dir = serve_world["v2"]
        r = c.post("/admin/reload", json={"expect_sha256": "0" * 64})
        err = r.json()["error"]  # the client's pin is named, not the reload (was field `reload`, a 422)
        assert r.status_code == 409 and err["field"] == "expect_sha256" and "do not serve this run" in err["message"]
        assert err["value"] == json.dumps("0" * 64) and v1 in err["message"]
        pins = Path(f"/tmp/semid-pins-{os.getpid()}-".ljust(64, "x"))  # 64 characters: was read as a file of pins,
        pins.write_text("root:x:0:0:secret-line\n", encoding="utf-8")  # and its first line came back in the error
        try:
            for path in (str(pins), "/etc/" + "/" * 53 + "passwd"):
                r = c.post("/admin/reload", json={"expect_sha256": path})
                assert r.status_code == 422 and r.json()["error"]["field"] == "expect_sha256", r.text
                assert "secret-line" not in r.text and "root:" not in r.text
        finally:
            pins.unlink()
        good = combined_digest(run_digests(serve_world["v2"]))
        broken = Path(shutil.copytree(serve_world["v2"], Path(f"/tmp/semid-broken-{os.getpid()}")))
        try:  # a folder missing a pinned file: the folder's fault, not the (right) pin's
            (broken / "semantic_ids.npz").unlink()
            target["path"] = app.state.holder.run_dir = broken
            r = c.post("/admin/reload", json={"expect_sha256": good})
            err = r.json()["error"]
            assert r.status_code == 500 and err["field"] == "reload" and "semantic_ids.npz: missing" in err["message"], r.text
        finally:
            shutil.rmtree(broken)
        target["path"] = app.state.holder.run_dir = serve_world["v2"]
        r = c.post("/admin/reload", json={"expect_sha256": good})
        assert r.status_code == 200 and r.json()["version"] != r.json()["previous"]


def _move_in_and_wait(c: TestClient, source: Path, live: Path, v1: str) -> None:
    """Copy ``source``'s version files over ``live`` and wait (up to 60 s) until the service no longer serves ``v1``."""
    for name in (CONFIG_FILE, IDS_FILE, HYBRID_FILE, "checkpoints/best.ckpt"):
        shutil.copy2(source / name, live / name)
        os.utime(live / name)
    deadline = time.monotonic() + 60
    while c.get("/readyz").json()["version"] == v1 and time.monotonic() < deadline:
        time.sleep(0.1)


def test_the_file_watch_swaps_in_a_new_version(serve_world: dict[str, Path], tmp_path: Path) -> None:
    live = tmp_path / "live"
    shutil.copytree(serve_world["v1"], live)
    app = app_for(live, watch_seconds=0.05)
    v1 = app.state.holder.current.version
    with TestClient(app) as c:
        time.sleep(0.3)
        assert c.get("/readyz").json()["version"] == v1  # nothing changed: no reload
        _move_in_and_wait(c, serve_world["v2"], live, v1)
        assert c.get("/readyz").json()["version"] == Recommender.from_run(serve_world["v2"]).version
        assert c.post("/recommend", json={"history": [3, 4]}).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_semid_serve_starts_answers_and_stops_cleanly(serve_world: dict[str, Path]) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "semid_cli", "serve", "--run", str(serve_world["v1"]), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline, ready = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert ready is not None and ready.status_code == 200, proc.poll()
        r = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"history": [3, 4, 5], "k": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        bad = httpx.post(f"http://127.0.0.1:{port}/recommend", content=b"{oops", timeout=30)
        assert bad.status_code == 400
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:  # not HTTP: uvicorn's parser refuses it
            raw.sendall(b"NOT HTTP\r\n\r\n")
            answer = b"".join(iter(lambda: raw.recv(4096), b""))  # until the service closes the connection
        assert answer.startswith(b"HTTP/1.1 400 ") and json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["field"] == "request"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines()[0].startswith("semid serve: ") and f"http://127.0.0.1:{port}" in out
    assert "Traceback" not in err and "weights_only" not in err, err


def test_a_port_in_use_is_refused_by_name_before_the_run_loads(serve_world: dict[str, Path],
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from semid_cli import main

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the run was loaded before the address was checked")

    monkeypatch.setattr(Recommender, "from_run", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--run", str(serve_world["v1"]), "--port", str(port)]) == 2
    assert f"127.0.0.1:{port}: cannot listen there (Address already in use): pick another --port" in capsys.readouterr().err
    assert main(["serve", "--run", str(serve_world["v1"]), "--host", "203.0.113.7"]) == 2  # not this machine's
    assert "203.0.113.7:8000: cannot listen there" in capsys.readouterr().err
    from semid_cli.serve import _check_address

    _check_address("", _free_port())  # every interface, as uvicorn takes an empty host
    try:
        socket.socket(socket.AF_INET6).close()
        ipv6 = socket.has_ipv6
    except OSError:
        ipv6 = False
    if ipv6:  # an IPv4 listener does not hold [::]:P: uvicorn binds IPv6 sockets v6-only
        with socket.socket() as busy4:
            busy4.bind(("0.0.0.0", 0))
            busy4.listen()
            _check_address("::", busy4.getsockname()[1])


def test_the_loaded_version_is_kept_out_of_full_collections(serve_world: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # a full gc pass over a loaded run's ~400k objects holds the GIL ~200 ms: the service's p99 under load. `semid
    # serve` freezes them before it listens, and a reload freezes the new version (after collecting the old garbage)
    import gc

    import uvicorn

    from semid_cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("frozen", gc.get_freeze_count()))
    gc.unfreeze()
    try:
        assert main(["serve", "--run", str(serve_world["v1"]), "--port", str(_free_port())]) == 0
        assert seen["frozen"] > 10_000  # the model, its tables and the catalogue's lists, frozen before listening
        gc.unfreeze()
        target = {"path": serve_world["v1"]}
        app = app_for(serve_world["v1"], target)
        with TestClient(app, base_url="http://127.0.0.1") as c, pytest.MonkeyPatch.context() as mp:
            mp.setattr("generator.serving.app._is_loopback", lambda host: True)
            target["path"] = serve_world["v2"]
            assert gc.get_freeze_count() == 0
            assert c.post("/admin/reload").status_code == 200
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_serve_takes_the_alpha_its_hint_names(serve_world: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A run without a stored fusion: `semid serve --decoder hybrid` said to give `--alpha A`, which serve did not take."""
    import shutil

    import uvicorn

    from semid_cli import main

    run = Path(shutil.copytree(serve_world["v1"], tmp_path / "run"))
    (run / "hybrid.json").unlink(missing_ok=True)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("app", app))
    assert main(["serve", "--run", str(run), "--decoder", "hybrid", "--port", str(_free_port())]) == 2
    assert "`--alpha A`" in capsys.readouterr().err
    assert main(["serve", "--run", str(run), "--decoder", "hybrid", "--alpha", "0.5", "--port", str(_free_port())]) == 0
    with TestClient(seen["app"], base_url="http://127.0.0.1") as c:
        r = c.post("/recommend", json={"history": [1, 2, 3], "k": 5})
        assert r.status_code == 200 and len(r.json()["items"]) == 5, r.text


def test_serve_starts_without_the_hybrid_when_its_fusion_file_is_damaged(
        serve_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged hybrid.json kept the whole service from starting; a missing one only the hybrid (a helper's audit)."""
    import uvicorn

    from semid_cli import main

    run = Path(shutil.copytree(serve_world["v1"], tmp_path / "run"))
    (run / "hybrid.json").write_text("{")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("app", app))
    assert main(["serve", "--run", str(run), "--port", str(_free_port())]) == 0
    with TestClient(seen["app"], base_url="http://127.0.0.1") as c:
        assert c.post("/recommend", json={"history": [1, 2, 3], "k": 5}).status_code == 200
        r = c.post("/recommend", json={"history": [1, 2, 3], "k": 5, "decoder": "hybrid"})
        assert r.status_code == 422 and "is not served here" in r.text, r.text  # (as without a hybrid.json)
    assert main(["serve", "--run", str(run), "--decoder", "hybrid", "--port", str(_free_port())]) == 2  # asked for: refused


def test_a_reload_to_another_catalogue_is_refused(serve_world: dict[str, Path]) -> None:
    """A run of another dataset was taken (200) and every item id then named another item (a helper's audit): a version
    that drops a served item, or gives one another asin, is refused and counted as failed; the old one serves."""
    import dataclasses

    from tests.test_generator_helpers import random_ids

    changes = {}

    def load() -> Recommender:
        rec = Recommender.from_run(serve_world["v1"])
        if changes.get("asins"):
            rec.catalogue = dataclasses.replace(rec.catalogue, original_ids=["X" + a for a in rec.catalogue.original_ids])
        if changes.get("fewer"):
            rec.run = dataclasses.replace(rec.run, ids=random_ids(rec.run.ids.num_items - 3))
        return rec

    from generator.serving.app import create_app
    from generator.serving.holder import Holder, Served

    holder = Holder(load, serve_world["v1"], served=Served.build(Recommender.from_run(serve_world["v1"])))
    app = create_app(holder)
    v1 = holder.current.version
    with TestClient(app) as c, pytest.MonkeyPatch.context() as mp:
        mp.setattr("generator.serving.app._is_loopback", lambda host: True)
        asin = c.get("/items/1").json()["asin"]
        changes["asins"] = True
        r = c.post("/admin/reload")
        err = r.json()["error"]["message"]
        assert r.status_code == 409 and f"another asin (item 1: {asin!r}, now {'X' + asin!r})" in err, r.text
        changes.update(asins=False, fewer=True)
        r = c.post("/admin/reload")
        assert r.status_code == 409 and "without 3 of the running version's" in r.json()["error"]["message"], r.text
        assert c.get("/readyz").json()["version"] == v1 and c.get("/items/1").json()["asin"] == asin
        assert 'semid_reloads_total{outcome="failed"} 2.0' in c.get("/metrics").text
        changes["fewer"] = False
        assert c.post("/admin/reload").status_code == 200  # the same catalogue reloads


def test_the_file_watch_tries_again_after_a_reload_by_hand(serve_world: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch marked changed files as seen before it reloaded: when a reload by hand was running (409 "in
    progress"), the new files were never loaded (a helper's audit). Busy, it looks again at the next poll."""
    from generator.serving.holder import Holder, ReloadBusy

    live = tmp_path / "live"
    shutil.copytree(serve_world["v1"], live)
    app = app_for(live, watch_seconds=0.05)
    v1 = app.state.holder.current.version
    busy = {"left": 3}
    real = Holder.reload

    async def sometimes_busy(self, expect_sha256=None):  # noqa: ANN001, ANN202
        if busy["left"]:
            busy["left"] -= 1
            raise ReloadBusy(409, "reload", None, "one reload at a time", "a reload is already in progress")
        return await real(self, expect_sha256)

    monkeypatch.setattr(Holder, "reload", sometimes_busy)
    with TestClient(app) as c:
        _move_in_and_wait(c, serve_world["v2"], live, v1)
        assert busy["left"] == 0 and c.get("/readyz").json()["version"] != v1

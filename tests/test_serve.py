"""The service (generator.serving, `semid serve`), in process: every endpoint, micro-batching gives what one-by-one
calls give, the bad-input table (4xx JSON naming field, value and what is allowed), an internal error answered as
JSON with the worker going on, and /admin refused to non-loopback clients without the token."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from generator.serving.requests import Limits
from tests.serve_helpers import HISTORIES, app_for, holder_for, serving
from tests.test_generator_helpers import NUM_ITEMS


def _items(response_items: list[dict]) -> list[int]:
    return [r["item_id"] for r in response_items]


def test_every_endpoint(serve_world: dict[str, Path]) -> None:
    app = app_for(serve_world["v1"])
    rec = app.state.holder.current.rec
    with TestClient(app) as c:  # runs the lifespan: the worker starts and stops with the app
        r = c.post("/recommend", json={"history": [3, 4, 5], "k": 4, "decoder": "dense", "exclude_history": True})
        assert r.status_code == 200, r.text
        body = r.json()
        want = rec.recommend([[3, 4, 5]], 4, "dense", exclude_history=True)[0]
        assert _items(body["items"]) == want.items.tolist() and not {3, 4, 5} & set(_items(body["items"]))
        np.testing.assert_allclose([i["score"] for i in body["items"]], want.scores, rtol=1e-5)
        assert body["version"] == rec.version and body["score_kind"] == "inner product" and body["decoder"] == "dense"
        assert body["k"] == 4 and body["num_beams"] is None  # dense has no beams
        first = body["items"][0]
        assert first["rank"] == 1 and first["title"] == f"item {first['item_id']}" and first["asin"] == f"A{first['item_id']:04d}"
        auto = c.post("/recommend", json={"history": [7]}).json()  # auto: beam, k 10 + 1 excluded: the loaded 20 beams
        assert auto["score_kind"] == "log-likelihood" and auto["decoder"] == "beam" and auto["num_beams"] == 20

        r = c.post("/recommend/batch", json={"histories": HISTORIES[:3], "k": 3, "decoder": "hybrid", "exclude_history": False})
        kind = rec._decoders["hybrid"].shared.fusion[0]  # the fusion train chose: a blend, or another fusion's score
        assert r.status_code == 200 and r.json()["score_kind"] == ("blend" if kind == "blend" else "fused")
        want = rec.recommend(HISTORIES[:3], 3, "hybrid")
        assert [_items(x) for x in r.json()["results"]] == [w.items.tolist() for w in want]

        item = c.get("/items/7").json()
        assert item["title"] == "item 7" and item["asin"] == "A0007" and item["version"] == rec.version
        assert item["semantic_id"] == rec.run.ids.codes[int(np.searchsorted(rec.run.ids.item_ids, 7))].tolist()
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["version"] == rec.version and set(ready["decoders"]) == {"beam", "exact", "dense", "hybrid"}
        metrics = c.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert 'semid_requests_total{endpoint="/recommend",status="200"} 2.0' in text
        assert 'semid_requests_total{endpoint="/items/{id}",status="200"} 1.0' in text
        assert "semid_request_seconds_bucket" in text and "semid_batch_histories_count" in text
        assert f'semid_model_info{{version="{rec.version}"}} 1.0' in text
        spec = c.get("/openapi.json").json()
        assert {"/recommend", "/recommend/batch", "/items/{item_id}", "/admin/reload"} <= set(spec["paths"])
        assert "history" in json.dumps(spec["paths"]["/recommend"]["post"]["requestBody"])
        assert c.get("/docs").status_code == 200
    assert not app.state.batcher.alive  # stopped with the app


def test_readyz_is_503_until_a_model_is_loaded(serve_world: dict[str, Path]) -> None:
    holder = holder_for(serve_world["v1"])
    served, holder.current = holder.current, None
    from generator.serving.app import create_app

    with TestClient(create_app(holder)) as c:
        assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200
        r = c.post("/recommend", json={"history": [1]})
        assert r.status_code == 503 and "no model" in r.json()["error"]["message"]
        holder.current = served
        assert c.get("/readyz").status_code == 200


def test_concurrent_requests_are_batched_and_get_what_one_by_one_calls_get(serve_world: dict[str, Path]) -> None:
    app = app_for(serve_world["v1"], max_wait_ms=50, max_batch=64)
    rec = app.state.holder.current.rec
    rng = random.Random(0)
    calls = []  # (history, k, decoder, exclude): mixed so that one batch holds several groups
    for _ in range(48):
        h = rng.sample(range(1, NUM_ITEMS + 1), rng.randint(1, 20))  # k + 20 excluded needs the 40-beam bucket
        calls.append((h, rng.choice([1, 5, 10]), rng.choice(["beam", "exact", "dense", "hybrid"]), rng.random() < 0.5))

    async def drive() -> tuple[list, list]:
        async with serving(app) as c:
            one = [c.post("/recommend", json={"history": h, "k": k, "decoder": d, "exclude_history": e}) for h, k, d, e in calls]
            many = [c.post("/recommend/batch", json={"histories": [h for h, *_ in calls[i:i + 6]], "k": 5, "decoder": "beam",
                                                     "exclude_history": True}) for i in range(0, 48, 6)]
            return await asyncio.gather(*one), await asyncio.gather(*many)

    singles, batches = asyncio.run(drive())
    for (h, k, d, e), r in zip(calls, singles, strict=True):
        assert r.status_code == 200, r.text
        beams = r.json()["num_beams"]  # the bucket it was decoded with (none for exact and dense)
        assert beams is None if d in ("exact", "dense") else beams == (20 if k + e * len(h) <= 20 else 40), (beams, h, k, d, e)
        want = rec.recommend([h], k, d, exclude_history=e, num_beams=beams)[0]  # one by one, no service
        assert _items(r.json()["items"]) == want.items.tolist(), (h, k, d, e)
        np.testing.assert_allclose([i["score"] for i in r.json()["items"]], want.scores, rtol=1e-4, atol=1e-5)
    for i, r in enumerate(batches):
        got, beams = [_items(x) for x in r.json()["results"]], r.json()["num_beams"]
        assert got == [rec.recommend([h], 5, "beam", exclude_history=True, num_beams=b)[0].items.tolist()
                       for (h, *_), b in zip(calls[i * 6:i * 6 + 6], beams, strict=True)]
    reg = app.state.metrics.registry
    requests, batches_run = reg.get_sample_value("semid_batch_requests_sum"), reg.get_sample_value("semid_batch_requests_count")
    assert requests == 56 and batches_run < requests / 2, f"{requests} requests in {batches_run} batches: not batched"
    assert reg.get_sample_value("semid_batch_histories_sum") == 48 + 48


def test_metrics_count_a_path_under_its_route_only_when_that_route_answers_it(serve_world: dict[str, Path]) -> None:
    app = app_for(serve_world["v1"])
    with TestClient(app) as c:
        assert [c.get(p).status_code for p in ("/items/3", "/items/", "/items/3/x", "/nowhere")] == [200, 404, 404, 404]
    value = app.state.metrics.registry.get_sample_value
    assert value("semid_requests_total", {"endpoint": "/items/{id}", "status": "200"}) == 1
    assert value("semid_requests_total", {"endpoint": "/items/{id}", "status": "404"}) is None  # (was 2)
    assert value("semid_requests_total", {"endpoint": "other", "status": "404"}) == 3


def _bad_inputs() -> list[tuple[object, int, str, str]]:
    """(body, status, field, a phrase of what is allowed)."""
    big = "x" * 5000
    return [
        (b"{\"history\": [1, 2", 400, "body", "malformed JSON"),
        (b'{"history": [1], "x": "\xc3\x28"}', 400, "body", "UTF-8"),
        (b"[1, 2]", 400, "body", "a JSON object"),
        (b"", 400, "body", "malformed JSON"),
        (b'{"history": [1], "history": [2]}', 400, "history", "given twice"),
        (b'{"history": [1], "user_id": 3}', 422, "user_id", "trained without user tokens"),  # (a causal run)
        (b'{"history": [1], "k": 3, "k": 4}', 400, "k", "given twice"),
        (b'{"' + b"q" * 1500 + b'": 1, "' + b"q" * 1500 + b'": 2}', 400, "q" * 57 + "...", "given twice"),  # cut
        (b'{"history": [1], "opts": [0, {"a": 1, "a": 2}]}', 400, "opts[1].a", "given twice"),  # named where it is
        (b'[{"k": 1}, {"k": 1, "k": 2}]', 400, "[1].k", "given twice"),
        (b'{"opts": {"a": 1, "a": 2}, "opts": {}}', 400, "opts", "given twice"),  # the inner one was replaced
        (b'{"opts": {"a": 1, "a": 2}, "k": 1, "k": 2}', 400, "opts.a", "given twice"),  # both stay: the inner one named
        (b'{"history": [' + b"1" * 4050 + b"]}", 422, "history[0]", "not an item of the catalogue"),  # message cut
        ({"k": 3}, 422, "history", "missing field"),
        ({"history": [1], "user": 3}, 422, "user", "the fields are"),
        ({"history": []}, 422, "history", "at least one item"),
        ({"history": "1,2"}, 422, "history", "a list of item ids"),
        ({"history": [1, "2"]}, 422, "history[1]", "an integer item id"),
        ({"history": [1, 2.5]}, 422, "history[1]", "an integer item id"),
        ({"history": [True]}, 422, "history[0]", "an integer item id"),
        ({"history": [1, 0]}, 422, "history[1]", "not an item of the catalogue"),
        ({"history": [NUM_ITEMS + 1]}, 422, "history[0]", "not an item of the catalogue"),
        ({"history": [10**30]}, 422, "history[0]", "not an item of the catalogue"),
        ({"history": [1] * 31}, 422, "history", "more than the limit of 30"),
        ({"history": [1], "k": 0}, 422, "k", f"[1, {NUM_ITEMS}]"),
        ({"history": [1], "k": NUM_ITEMS + 1}, 422, "k", f"[1, {NUM_ITEMS}]"),
        ({"history": [1], "k": "10"}, 422, "k", "an integer"),
        ({"history": list(range(1, 11)), "k": NUM_ITEMS - 5}, 422, "k", "distinct items of `history` to exclude is more "
         f"than the catalogue's {NUM_ITEMS} items: ask for `k` of at most {NUM_ITEMS - 10}, or rank the history's items too"),
        ({"history": [1], "decoder": "nope"}, 422, "decoder", "'auto', 'beam'"),
        ({"history": [1], "decoder": "title-beam"}, 422, "decoder", "not served"),
        ({"history": [1], "exclude_history": "yes"}, 422, "exclude_history", "true or false"),
        ({"history": [1], "pad": big}, 413, "body", "at most 4096 bytes"),
    ]


@pytest.mark.parametrize(("body", "status", "field", "phrase"), _bad_inputs(), ids=lambda x: str(x)[:30])
def test_bad_input_is_a_4xx_json_naming_the_field(serve_world: dict[str, Path], body: object, status: int, field: str,
                                                  phrase: str) -> None:
    app = app_for(serve_world["v1"], limits=Limits(max_body_bytes=4096, max_history=30))
    with TestClient(app) as c:
        r = c.post("/recommend", content=body) if isinstance(body, bytes) else c.post("/recommend", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["field"] == field and phrase in err["message"] + err["allowed"], err
        sent = "missing field" not in err["message"] and status != 413  # (an oversized body is not echoed at all)
        assert (err["value"] is not None) == sent and "Traceback" not in r.text and len(r.content) < 1000  # nothing echoed whole
        assert c.post("/recommend", json={"history": [1, 2]}).status_code == 200  # still serving


@pytest.mark.parametrize(("k", "text"), [("10", '"10"'), (10.5, "10.5"), (None, "null"), (True, "true"), (0, "0"),
                                         ([1, "é"], '[1, "é"]')])
def test_a_refused_value_is_named_as_the_json_the_client_sent(serve_world: dict[str, Path], k: object, text: str) -> None:
    # (was Python's repr: '10' for the string, None for null, True for true)
    with TestClient(app_for(serve_world["v1"])) as c:
        r = c.post("/recommend", json={"history": [1, 2], "k": k})
        err = r.json()["error"]
        assert r.status_code == 422 and err["field"] == "k" and err["value"] == text and err["message"].endswith(text)


def test_refused_values_are_cut_however_long_or_deep(serve_world: dict[str, Path]) -> None:
    with TestClient(app_for(serve_world["v1"], limits=Limits(max_history=3))) as c:
        r = c.post("/" + "x" * 5000)  # (a 404's path and a 405's method were echoed whole, not as JSON)
        err = r.json()["error"]
        assert r.status_code in (404, 405) and len(r.content) < 1000 and err["value"].startswith('"/xxx')
        r = c.post("/recommend", json={"history": list(range(1, 40))})  # the list itself, cut (was a description)
        err = r.json()["error"]
        assert r.status_code == 422 and err["value"].startswith("[1, 2, 3") and err["value"].endswith("...")
        for depth in range(900, 1000, 3):  # json.loads took some that json.dumps could not show: a 500 (the band
            deep = "[" * depth + "]" * depth  # depends on the stack: every depth around the parser's limit)
            r = c.post("/recommend", content=f'{{"history": [1], "k": {deep}}}'.encode())
            assert r.status_code in (400, 422), (depth, r.text)
    from generator.serving.requests import short_json

    nested: list = []
    for _ in range(100_000):  # loop to build a value deeper than any stack
        nested = [nested]
    assert short_json(nested) == "(nested too deep to show)" and short_json({"a": "é"}) == '{"a": "é"}'


def test_large_bodies_are_refused_without_echoing_them(serve_world: dict[str, Path]) -> None:
    """Within the default 1 MiB: an unknown field of 200,000 characters is named cut, not echoed; a body of many
    objects each giving a key twice, all replaced by an outer key given twice, is named by the outer one (one walk
    over the body finds it: a walk per repeat held the event loop for 40 s on a 160 KB body)."""
    repeats = b'{"x": [' + b",".join([b'{"a": 0, "a": 0}'] * 300) + b'], "x": [' + b",".join([b"[]"] * 3000) + b"]}"
    with TestClient(app_for(serve_world["v1"])) as c:
        for body, status, field in ((json.dumps({"history": [1], "u" * 200_000: 3}).encode(), 422, "u" * 77 + "..."),
                                    (repeats, 400, "x")):
            r = c.post("/recommend", content=body)
            assert r.status_code == status and r.json()["error"]["field"] == field and len(r.content) < 1000, r.text[:300]
        assert c.post("/recommend", json={"history": [1, 2]}).status_code == 200


def test_a_number_too_long_to_read_is_a_400(serve_world: dict[str, Path]) -> None:
    with TestClient(app_for(serve_world["v1"])) as c:  # Python reads at most 4,300 digits of an int
        for body in (b'{"history": [' + b"7" * 5001 + b"]}", b'{"history": [1], "k": ' + b"9" * 5001 + b"}"):
            r = c.post("/recommend", content=body)
            assert r.status_code == 400 and "ordinary size" in r.json()["error"]["allowed"] and len(r.content) < 1000, r.text
        assert c.post("/recommend", json={"history": [1, 2]}).status_code == 200


def test_bad_batches_items_and_paths(serve_world: dict[str, Path]) -> None:
    app = app_for(serve_world["v1"], limits=Limits(max_body_bytes=4096, max_batch_histories=4))
    with TestClient(app) as c:
        cases = [
            (c.post("/recommend/batch", json={"histories": []}), 422, "histories"),
            (c.post("/recommend/batch", json={"histories": [[1]] * 5}), 422, "histories"),
            (c.post("/recommend/batch", json={"histories": [[1], [2, "x"]]}), 422, "histories[1][1]"),
            (c.post("/recommend/batch", json={"history": [1]}), 422, "history"),
            (c.post("/recommend/batch", content=(b"[%b]" % b",".join([b"1"] * 3000))), 413, "body"),
            (c.get("/items/0"), 404, "item_id"),
            (c.get("/items/99999999999999999999999"), 422, "item_id"),
            (c.get("/items/abc"), 422, "item_id"),
            (c.get("/nowhere"), 404, "path"),
            (c.get("/recommend"), 405, "method"),
            (c.put("/healthz"), 405, "method"),
            (c.post("/recommend?k=50", json={"history": [1]}), 422, "query"),  # never ignored
            (c.get("/items/1?fields=title"), 422, "query"),  # (was answered, the query ignored in silence)
        ]
        for r, status, field in cases:
            assert r.status_code == status and r.json()["error"]["field"] == field, (r.request.url, r.text)
            if status == 405:  # HTTP: a 405 names the methods the route takes, in its Allow header and the body
                assert r.headers["allow"] and r.json()["error"]["allowed"] == r.headers["allow"], (r.headers, r.text)

        err = c.post("/recommend", json={"history": [1], "decoder": "nope"}).json()["error"]
        assert "title-beam" not in err["message"] + err["allowed"], err  # what this run serves, not every decoder

        def chunks():  # a body without a length, over the limit as it streams in
            for _ in range(10):
                yield b" " * 1000

        r = c.post("/recommend", content=chunks())
        assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_an_internal_error_is_a_500_json_and_the_worker_goes_on(serve_world: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    app = app_for(serve_world["v1"])
    rec = app.state.holder.current.rec
    real = rec.recommend

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("decoder blew up")

    with TestClient(app, raise_server_exceptions=False) as c:
        monkeypatch.setattr(rec, "recommend", broken)
        r = c.post("/recommend", json={"history": [1, 2]})
        assert r.status_code == 500 and "internal error" in r.json()["error"]["message"]
        assert "Traceback" not in r.text and "blew up" not in r.text
        monkeypatch.setattr(rec, "recommend", real)
        assert c.post("/recommend", json={"history": [1, 2]}).status_code == 200


def test_a_client_gone_before_its_body_is_a_499_not_a_500(serve_world: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """A client that closes the connection half-way through its body is not the service's error: no 500, no
    traceback logged, counted as 499 (nginx's "client closed request")."""
    app = app_for(serve_world["v1"])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/recommend", "raw_path": b"/recommend", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    messages = iter([{"type": "http.request", "body": b'{"history": [1, ', "more_body": True}, {"type": "http.disconnect"}])
    sent: list[dict] = []

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    async def call() -> None:
        async with serving(app):
            await app(scope, receive, send)

    asyncio.run(call())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert app.state.metrics.registry.get_sample_value("semid_requests_total", {"endpoint": "/recommend", "status": "499"}) == 1


@pytest.mark.parametrize(("client", "token", "status"), [
    (("10.1.2.3", 4000), None, 403),
    (("10.1.2.3", 4000), "wrong", 403),
    (("10.1.2.3", 4000), "s3cret", 200),
    (("10.1.2.3", 4000), "bearer s3cret", 200),  # HTTP's auth schemes are case-insensitive (was a 403)
    (("10.1.2.3", 4000), "BEARER  s3cret", 200),
    (("10.1.2.3", 4000), "Basic s3cret", 403),
    (("127.0.0.1", 4000), None, 200),
    (("::1", 4000), None, 200),
])
def test_admin_answers_loopback_or_the_token_only(serve_world: dict[str, Path], client: tuple[str, int], token: str | None,
                                                  status: int) -> None:
    app = app_for(serve_world["v1"], admin_token="s3cret")
    version = app.state.holder.current.version

    async def drive() -> tuple[int, dict, int]:
        async with serving(app, client=client) as c:
            headers = {"Authorization": token if " " in (token or "") else f"Bearer {token}"} if token else {}
            r = await c.post("/admin/reload", headers=headers)
            return r.status_code, r.json(), (await c.post("/recommend", json={"history": [1]})).status_code

    code, body, after = asyncio.run(drive())
    assert code == status and after == 200, body

    async def from_a_page() -> int:  # a browser's request (an Origin header) gets the token's answer only
        async with serving(app, client=client) as c:
            bearer = token if " " in (token or "") else f"Bearer {token}"
            headers = {"Origin": "http://evil.example", **({"Authorization": bearer} if token else {})}
            r = await c.post("/admin/reload", headers=headers, content=b"")
            return r.status_code, r.json()

    page, answer = asyncio.run(from_a_page())
    assert page == (status if (token or "").endswith("s3cret") else 403), answer
    assert page != 403 or answer["error"]["field"] in ("client", "origin")
    if status == 403:
        assert body["error"]["field"] == "client" and body["error"]["value"] == json.dumps(client[0])
        assert app.state.holder.current.version == version
    else:
        assert body["version"] == version and body["previous"] == version  # reloaded the same run


def test_admin_without_a_token_answers_loopback_only(serve_world: dict[str, Path]) -> None:
    app = app_for(serve_world["v1"])  # no --admin-token: an empty bearer must not pass

    async def drive() -> int:
        async with serving(app, client=("192.168.0.9", 1)) as c:
            return (await c.post("/admin/reload", headers={"Authorization": "Bearer "})).status_code

    assert asyncio.run(drive()) == 403


def test_a_client_gone_while_its_request_is_decoded_cancels_it(serve_world: dict[str, Path]) -> None:
    """A client that closes the connection after its body, while the request waits to be decoded, cancels it (the
    worker drops its slices not decoded yet: tests/test_serve_batching.py) and is counted as 499; before, it was
    decoded in full and counted as a 200 (a timed-out client's retries multiplied the load)."""
    app = app_for(serve_world["v1"])
    body = b'{"histories": [[1, 2], [3]], "k": 5}'
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/recommend/batch", "raw_path": b"/recommend/batch", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    sent: list[dict] = []
    submitted: list[asyncio.Future] = []

    async def submit(*args: object) -> object:  # a decode that has not finished when the client goes
        submitted.append(asyncio.get_running_loop().create_future())
        return await submitted[-1]

    async def call() -> None:
        decoding = asyncio.Event()
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict:
            if (message := next(messages, None)) is not None:
                return message
            await decoding.wait()  # the disconnect comes once the request is with the decoder
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        async with serving(app):
            app.state.batcher.submit = submit
            task = asyncio.ensure_future(app(scope, receive, send))
            while not submitted:
                await asyncio.sleep(0.01)
            decoding.set()
            await asyncio.wait_for(task, 10)

    asyncio.run(call())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert submitted[0].cancelled()  # the worker skips a cancelled request's slices
    assert app.state.metrics.registry.get_sample_value("semid_requests_total", {"endpoint": "/recommend/batch", "status": "499"}) == 1


def test_what_clients_and_checkers_send_that_the_api_allows(serve_world: dict[str, Path]) -> None:
    """A null user id (the API page's schema allows it; generated clients send it) is no user id; health checkers
    that send HEAD get their answer; a path with a trailing slash is a JSON 404, not an empty redirect to a URL made
    from the client's Host header."""
    with TestClient(app_for(serve_world["v1"])) as c:
        assert c.post("/recommend", json={"history": [1, 2], "user_id": None}).status_code == 200
        assert c.post("/recommend/batch", json={"histories": [[1], [2]], "user_ids": None}).status_code == 200
        assert c.head("/healthz").status_code == 200 and c.head("/readyz").status_code == 200
        r = c.post("/recommend/", json={"history": [1]}, follow_redirects=False)
        assert r.status_code == 404 and r.json()["error"]["field"] == "path"


def test_a_request_cancelled_as_the_server_stops_is_a_json_503() -> None:
    """uvicorn cancels the requests still open when its grace period at shutdown is over: each gets a JSON 503 (it
    got a plain-text 500 and a logged traceback), counted as such."""
    from generator.serving.metrics import Metrics, MetricsMiddleware

    async def slow(scope: dict, receive: object, send: object) -> None:  # a request that never finishes
        await asyncio.Event().wait()

    metrics, sent = Metrics(), []

    async def send(message: dict) -> None:
        sent.append(message)

    async def call() -> None:
        task = asyncio.ensure_future(MetricsMiddleware(slow, metrics)({"type": "http", "path": "/recommend"}, None, send))
        await asyncio.sleep(0.01)
        task.cancel()  # what uvicorn does
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(call())
    assert sent[0]["status"] == 503 and json.loads(sent[1]["body"])["error"]["message"].startswith("the service is shutting down")
    assert metrics.registry.get_sample_value("semid_requests_total", {"endpoint": "/recommend", "status": "503"}) == 1


def _scope(path: str, length: int) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}


def test_a_stalled_body_is_a_408_and_a_slow_one_is_answered_by_the_version_current_when_it_is_in(
        serve_world: dict[str, Path]) -> None:
    """A client that sent part of its body and stalled held the connection for ever, and with it the version current
    when it connected (each stalled client kept one more model alive across reloads: a helper's audit). The body
    has ``Limits.body_seconds``; the version is taken once the body is in."""
    target = {"path": serve_world["v1"]}
    app = app_for(serve_world["v1"], target)  # (a reload takes longer than the short limit below)
    short = app_for(serve_world["v1"], limits=Limits(body_seconds=0.5))
    v1 = app.state.holder.current.version
    body = json.dumps({"history": [1, 2]}).encode()

    async def exchange(receive, to=app) -> tuple[int, dict]:  # noqa: ANN001
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await to(_scope("/recommend", len(body)), receive, send)
        return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))

    async def drive() -> tuple:
        async with serving(app), serving(short):
            async def stalled() -> dict:
                if stalled.sent:
                    await asyncio.sleep(3600)
                stalled.sent = True
                return {"type": "http.request", "body": body[:6], "more_body": True}
            stalled.sent = False
            gate, calls = asyncio.Event(), []

            async def slow() -> dict:
                calls.append(1)
                if len(calls) == 1:
                    return {"type": "http.request", "body": body[:6], "more_body": True}
                if len(calls) > 2:  # the body is in: the client waits for its answer (a server's receive blocks)
                    await asyncio.sleep(3600)
                await gate.wait()  # the rest of the body comes after the reload
                return {"type": "http.request", "body": body[6:], "more_body": False}

            timed_out = await exchange(stalled, short)
            pending = asyncio.ensure_future(exchange(slow))
            await asyncio.sleep(0.1)
            target["path"] = serve_world["v2"]
            new = await app.state.holder.reload()
            gate.set()
            return timed_out, await pending, new.version

    (status, err), (status2, answer), v2 = asyncio.run(drive())
    assert status == 408 and err["error"]["field"] == "body" and "0.5 s" in err["error"]["message"], err
    assert v2 != v1 and status2 == 200 and answer["version"] == v2, answer


def test_a_batch_answer_is_made_off_the_event_loop(serve_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """1,024 histories x k = 100 made ~14 MB of JSON on the event loop (0.7 s during which /healthz waited: a helper's
    audit): the answer is built on a worker thread, and its bytes are the JSON of what one-by-one calls give."""
    import threading

    from generator.serving import app as app_module

    made_on, real = [], app_module._batch_answer

    def recording(*args):  # noqa: ANN002, ANN202
        made_on.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(app_module, "_batch_answer", recording)
    app = app_for(serve_world["v1"])

    async def drive() -> tuple[dict, dict, int]:
        async with serving(app) as c:
            batch = (await c.post("/recommend/batch", json={"histories": HISTORIES, "k": 5})).json()
            one = (await c.post("/recommend", json={"history": HISTORIES[0], "k": 5})).json()
            return batch, one, threading.get_ident()

    batch, one, loop_thread = asyncio.run(drive())
    assert made_on and loop_thread not in made_on
    assert len(batch["results"]) == len(HISTORIES) and _items(batch["results"][0]) == _items(one["items"])
    assert [r["score"] for r in batch["results"][0]] == pytest.approx([r["score"] for r in one["items"]], abs=1e-5)

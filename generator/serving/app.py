"""The FastAPI app of ``semid serve`` (routes in the module doc of docs/architecture.md, "The serving path").

Handlers read the body themselves (a byte limit, then ``json.loads``) and check it with ``generator.serving.requests``,
so every refusal is a 4xx JSON that names the field, the value and what is allowed; the pydantic models below only
document the API (the OpenAPI page at ``/docs``). The event loop checks and answers; the decoding worker
(``generator.serving.batcher``) runs torch; a reload loads on a thread of its own (``generator.serving.holder``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from generator.runs.recommender import Recommendation
from generator.serving.batcher import MicroBatcher
from generator.serving.holder import Holder, ReloadBusy, Served, VersionRefused, watch_signature
from generator.serving.metrics import ROUTES, Metrics, MetricsMiddleware
from generator.serving.requests import MISSING, ApiError, Limits, parse_body, parse_query, short_json

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # a client that closed the connection before its request was read (nginx's code)


# ---- the API's documentation (OpenAPI) ---------------------------------------------------------------------------
BEAMS = ("the beams this history was decoded with (null: the decoder has none): the smallest of the loaded beams times "
         "1, 2, 4, ... that holds k plus the history's distinct items when they are excluded. The items are what "
         "`Recommender.recommend([history], k, decoder, exclude_history=..., num_beams=num_beams)` returns for this "
         "history alone, whatever else was decoded in the same batch")


class RecommendRequest(BaseModel):
    history: list[int] = Field(description="item ids, oldest first", examples=[[12, 45, 99]])
    k: int = Field(10, description="items to return: 1 to min(100, catalogue size)")
    decoder: str = Field("auto", description="a decoder the service loaded (see /readyz); auto: the service's default")
    exclude_history: bool = Field(True, description="leave the history's items out of the ranking")
    user_id: int | None = Field(None, description="the user's id, for a run trained with user tokens (T5 runs with "
                                "--user-tokens; refused by others)")


class BatchRequest(BaseModel):
    histories: list[list[int]] = Field(description="one history per user (item ids, oldest first), at most 1024")
    k: int = 10
    decoder: str = "auto"
    exclude_history: bool = True
    user_ids: list[int] | None = Field(None, description="one user id per history (a run trained with user tokens)")


class RankedItem(BaseModel):
    rank: int
    item_id: int
    asin: str | None = Field(description="the dataset's original id (null where the catalogue has none)")
    title: str | None
    score: float | None = Field(description="what `score_kind` says; higher is better")


class RecommendResponse(BaseModel):
    version: str = Field(description="the model version: ckpt-<sha256[:16]>.ids-<sha256[:16]>")
    decoder: str
    score_kind: str = Field(description="what the scores are (log-likelihood, inner product, fused, ...)")
    k: int
    num_beams: int | None = Field(description=BEAMS)
    items: list[RankedItem]


class BatchResponse(BaseModel):
    version: str
    decoder: str
    score_kind: str
    k: int
    num_beams: list[int | None] = Field(description="per history, as `num_beams` of /recommend")
    results: list[list[RankedItem]]


class ErrorBody(BaseModel):
    error: dict[str, str | None] = Field(description="field, value, allowed, message")


ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 404, 413, 422, 503)}


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


# ---- helpers -----------------------------------------------------------------------------------------------------
def _json(obj: Any, status: int = 200) -> Response:
    try:  # orjson: a 1,024-history answer of k = 100 is 14 MB, 550 ms of the event loop with json.dumps
        body = orjson.dumps(obj)
    except TypeError:  # (what orjson refuses: a lone surrogate echoed in an error, an int beyond 64 bits)
        body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status, media_type="application/json")


def _error(status: int, field: str | None, value: str | None, allowed: str | None, message: str) -> Response:
    return _json({"error": {"field": field, "value": value, "allowed": allowed, "message": message}}, status)


def _no_query(request: Request) -> None:
    if request.query_params:  # (``?k=50`` would be ignored: the body's fields are the request)
        raise ApiError(422, "query", request.url.query, "no query parameters: every field goes in the JSON body"
                       if request.method == "POST" else "no query parameters: this route takes none")


async def _read_body(request: Request, limits: Limits) -> bytes:
    """The body, whole, within ``limits.max_body_bytes`` and ``limits.body_seconds`` (408 after: a client that stalls
    mid-body no longer holds a connection, nor the version it found, for as long as it likes)."""
    _no_query(request)
    try:
        return await asyncio.wait_for(_read_whole(request, limits.max_body_bytes), limits.body_seconds)
    except TimeoutError:
        raise ApiError(408, "body", MISSING, f"the whole body within {limits.body_seconds:g} s", "the body did not "
                       f"arrive whole within {limits.body_seconds:g} s") from None


async def _read_whole(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body", MISSING, f"at most {limit} bytes", f"the body has {declared} bytes, more than the "
                       f"limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # a body without a length is counted as it comes
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body", MISSING, f"at most {limit} bytes", f"the body has more than the limit of "
                               f"{limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the client went away: not the service's error (counted as 499, nginx's "closed")
        raise ApiError(CLIENT_CLOSED, "body", MISSING, "the whole body", "the client closed the connection "
                       "before sending the whole body") from None
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection (its body read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _batch_answer(served: Served, q: Any, out: list[Recommendation], beams: list[int | None]) -> Response:
    """A batch's answer, made on a worker thread (up to 1,024 x 100 ranked items: ~150 ms of Python objects that
    stalled every other request on the event loop, /healthz too)."""
    return _json({"version": served.version, "decoder": q.decoder, "score_kind": served.rec.score_kind(q.decoder),
                  "k": q.k, "num_beams": beams, "results": [_ranked(served, o) for o in out]})


def _ranked(served: Served, out: Recommendation) -> list[dict[str, Any]]:
    rows = served.rows(out.items).tolist()
    return [{"rank": r, "item_id": i, "asin": served.asins[row], "title": served.titles[row],
             "score": s if math.isfinite(s) else None}
            for r, (i, row, s) in enumerate(zip(out.items.tolist(), rows, out.scores.tolist(), strict=True), start=1)]


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address ("testclient")
        return host == "localhost"


def create_app(holder: Holder, *, max_batch: int = 256, max_wait_ms: float = 5.0, threads: int = 1,
               limits: Limits | None = None, admin_token: str | None = None, watch_seconds: float = 0.0) -> FastAPI:
    """The service's app over ``holder`` (its current version, and how to load a new one).

    Args:
        max_batch, max_wait_ms, threads: the micro-batcher's (``MicroBatcher``).
        admin_token: /admin routes also answer non-loopback clients that send ``Authorization: Bearer TOKEN``.
        watch_seconds: poll the run's files this often and reload when they changed and held still for one poll
            (0: no watch; reload with POST /admin/reload).
    """
    limits = limits if limits is not None else Limits()
    metrics = Metrics()
    batcher = MicroBatcher(max_batch=max_batch, max_wait_ms=max_wait_ms, threads=threads, on_batch=metrics.on_batch)
    if holder.current is not None:
        metrics.model.info({"version": holder.current.version})

    async def watch() -> None:
        last = pending = await asyncio.to_thread(watch_signature, holder.run_dir)
        while True:
            await asyncio.sleep(watch_seconds)
            sig = await asyncio.to_thread(watch_signature, holder.run_dir)
            if sig == last:
                continue
            if sig != pending:  # changed since the last poll: wait until the writer is done
                pending = sig
                continue
            try:
                await reload_now(None)
            except ReloadBusy:  # a reload by hand runs (it may have read a half-moved folder): try again next poll
                continue
            except ApiError as e:
                log.warning("file watch: %s", e.message)
            last = sig  # (these files were tried: a version they refused is not tried again until they change)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        batcher.start()
        task = asyncio.create_task(watch()) if watch_seconds > 0 else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="semid", version="1", lifespan=lifespan, redirect_slashes=False, description="Next-item recommendations from a semid run "
                  "(generative retrieval with semantic IDs). Errors are JSON: {error: {field, value, allowed, message}}.")
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.holder, app.state.batcher, app.state.metrics = holder, batcher, metrics

    def ready() -> Served:
        served = holder.current
        if served is None or not batcher.alive:
            raise ApiError(503, None, MISSING, None, "no model is loaded yet (see /readyz)")
        return served

    async def decode(request: Request, batch: bool) -> tuple[Served, Any, list[Recommendation], list[int | None]]:
        ready()  # (refused before the body is read)
        body = await _read_body(request, limits)
        served = ready()  # the version current once the body is in: a slow body never keeps an old version alive
        q = parse_query(parse_body(body), served.rec, limits, batch=batch)
        work = asyncio.ensure_future(batcher.submit(served.rec, q.histories, q.k, q.decoder, q.exclude_history, q.user_ids))
        gone = asyncio.ensure_future(_disconnected(request))  # a client that went away: its request is cancelled, the
        try:  # slices not decoded yet are dropped by the worker (a timed-out client's retries once doubled the load)
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            raise ApiError(CLIENT_CLOSED, "connection", MISSING, "a client that waits for the answer", "the client "
                           "closed the connection before the answer: its request was not decoded further")
        try:
            return served, q, *work.result()
        except (ValueError, TypeError) as e:  # the decoder refused what the checks let through: name it
            raise ApiError(422, "decoder", q.decoder, f"a request that decoder `{q.decoder}` can serve",
                           f"decoder `{q.decoder}` refused this request: {e}") from None

    async def reload_now(expect: str | None) -> Served:
        old = holder.current
        try:
            new = await holder.reload(expect)
        except ApiError as e:  # failed: the new version did not load, or its files were refused; refused: the request
            failed = e.status >= 500 or isinstance(e, VersionRefused)
            metrics.reloads.labels("failed" if failed else "refused").inc()
            raise
        metrics.reloads.labels("done").inc()
        metrics.model.info({"version": new.version})
        log.info("reloaded: %s -> %s", old.version if old else None, new.version)
        return new

    async def admin_request(request: Request) -> dict[str, Any]:
        """The body of an /admin request from a client these routes answer (a 403 otherwise)."""
        host = request.client.host if request.client else None
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""  # (HTTP's schemes are case-insensitive)
        token_ok = bool(admin_token) and hmac.compare_digest(given.encode(), admin_token.encode())
        if not _is_loopback(host) and not token_ok:
            raise ApiError(403, "client", host, "a loopback client, or `Authorization: Bearer TOKEN` with the token "
                           "given at start (--admin-token)", f"/admin routes answer loopback clients or the admin "
                           f"token only; {host} sent {'a wrong token' if given else 'no token'}")
        if "origin" in request.headers and not token_ok:  # a web page's request (a browser sends its Origin), not a tool's
            raise ApiError(403, "origin", request.headers["origin"], "no Origin header (a command-line client), or the "
                           "admin token", "/admin routes do not answer web pages: a page open in a browser on this "
                           "machine could otherwise reload the service")
        body = await _read_body(request, limits)
        doc = parse_body(body, example='{"expect_sha256": "<64 hex digits>"}') if body.strip() else {}
        extra = [name for name in doc if name != "expect_sha256"]
        if extra:
            raise ApiError(422, extra[0], doc[extra[0]], "only `expect_sha256`", f"unknown field `{extra[0][:57]}`: "
                           "the body takes `expect_sha256` only")
        return doc

    # ---- routes --------------------------------------------------------------------------------------------------
    @app.post("/recommend", response_model=RecommendResponse, responses=ERRORS, openapi_extra=_body_doc(RecommendRequest))
    async def recommend(request: Request) -> Response:
        """Top-k items for one history."""
        served, q, out, beams = await decode(request, batch=False)
        return _json({"version": served.version, "decoder": q.decoder, "score_kind": served.rec.score_kind(q.decoder),
                      "k": q.k, "num_beams": beams[0], "items": _ranked(served, out[0])})

    @app.post("/recommend/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=_body_doc(BatchRequest))
    async def recommend_batch(request: Request) -> Response:
        """Top-k items for each of many histories (results in the order of `histories`)."""
        served, q, out, beams = await decode(request, batch=True)
        return await asyncio.to_thread(_batch_answer, served, q, out, beams)

    @app.get("/items/{item_id}", responses=ERRORS)
    async def item(item_id: str, request: Request) -> Response:
        """An item: its asin, title and semantic ID (codes, one per level)."""
        _no_query(request)  # (`?fields=...` was ignored in silence)
        served = ready()
        ids = served.rec.run.ids.item_ids
        allowed = f"an item id of the catalogue ({int(ids[0])}..{int(ids[-1])}, {len(ids)} items)"
        if not (item_id.isascii() and item_id.isdigit()) or len(item_id) > 18:
            raise ApiError(422, "item_id", item_id, allowed)
        row = int(served.rows(int(item_id)))
        if row >= len(ids) or ids[row] != int(item_id):
            raise ApiError(404, "item_id", item_id, allowed, f"no item {item_id}: `item_id` must be {allowed}")
        return _json({"item_id": int(item_id), "asin": served.asins[row], "title": served.titles[row],
                      "semantic_id": served.rec.run.ids.codes[row].tolist(), "version": served.version})

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # (health checkers that send HEAD got a 405)
    async def healthz() -> Response:
        """The process is up."""
        return _json({"status": "ok"})

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz() -> Response:
        """A model is loaded and the decoding worker runs (503 otherwise)."""
        served = holder.current
        if served is None or not batcher.alive:
            return _json({"status": "not ready", "model_loaded": served is not None, "worker": batcher.alive}, 503)
        rec = served.rec
        return _json({"status": "ready", "version": served.version, "decoders": list(rec.decoders),
                      "default_decoder": rec.resolve(None), "items": int(rec.run.ids.num_items),
                      "reloading": holder.reloading})

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text: request counts, latency, batch sizes, reloads, the version."""
        body, kind = metrics.text()
        return Response(body, media_type=kind)

    @app.post("/admin/reload", responses=ERRORS | {403: {"model": ErrorBody}, 409: {"model": ErrorBody}})
    async def reload(request: Request) -> Response:
        """Load the run folder again (a new IDs version, a new best checkpoint) beside the served version and swap;
        a version that fails is refused and the running one keeps serving. Loopback clients, or the admin token.
        Body (optional): {"expect_sha256": "<combined digest>"}, required when the service was started pinned."""
        try:  # every refusal of the request counts as `refused` (the client, its origin, its body too)
            doc = await admin_request(request)
        except ApiError:
            metrics.reloads.labels("refused").inc()
            raise
        old = holder.current
        new = await reload_now(doc.get("expect_sha256"))
        return _json({"version": new.version, "previous": old.version if old else None})

    # ---- errors: JSON, never a traceback -----------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        return _json(e.body(), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        methods = (e.headers or {}).get("Allow") if e.status_code == 405 else None  # (HTTP: a 405 says what is allowed)
        allowed = f"one of {[r for r in ROUTES]} or /items/{{id}}" if e.status_code == 404 else methods
        what = request.url.path if methods is None else request.method  # (cut: a path of any length is not echoed)
        out = _error(e.status_code, "path" if methods is None else "method", short_json(what), allowed,
                     f"{e.detail}: {request.method[:20]} {short_json(request.url.path)}")
        out.headers.update(e.headers or {})
        return out

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        return _error(422, ".".join(map(str, first.get("loc", ()))), short_json(first.get("input", MISSING)), None, str(first.get("msg")))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, None, None, None, "internal error: the service logged it and goes on serving")

    return app

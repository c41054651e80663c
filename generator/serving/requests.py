"""What the service accepts, checked at the boundary: every bad input is an :class:`ApiError` (a 4xx JSON body that
names the field, the value and what is allowed), never a traceback.

Limits (:class:`Limits`): the body's bytes, a history's items, a batch's histories and k; ``k`` is also capped by the
catalogue. Item ids must be integers (JSON numbers without a fraction, not booleans) of the served catalogue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from generator.models.config import is_plain_int as is_int  # (JSON's ints: no numpy ones)
from generator.runs.recommender import Recommender
from semid.safe_read import cut, repeated_key


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_body_bytes: int = 1 << 20
    max_history: int = 1000
    max_batch_histories: int = 1024
    max_k: int = 100
    body_seconds: float = 30.0  # a body not read whole by then is a 408 (a stalled client held its version's model)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_history", "max_batch_histories", "max_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if not isinstance(self.body_seconds, (int, float)) or isinstance(self.body_seconds, bool) or not 0 < self.body_seconds < 1e6:
            raise ValueError(f"`body_seconds` must be a positive number of seconds, got {self.body_seconds!r}")


MISSING = object()  # an ApiError's value where the request gave none (a missing field): JSON null


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` and a JSON body naming ``field``, ``value`` and ``allowed``.

    ``value`` is what the client sent as JSON text (``"10"`` for the string, ``10`` for the number, ``null``), cut to
    80 characters (:func:`short_json`); null where it sent none (:data:`MISSING`)."""

    def __init__(self, status: int, field: str | None, value: Any, allowed: str | None, message: str | None = None
                 ) -> None:
        self.status, self.field, self.value, self.allowed = status, field and cut(field, 80), short_json(value), allowed
        self.message = message or f"`{self.field}` must be {allowed}, got {self.value}"
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "value": self.value, "allowed": self.allowed, "message": self.message}}


def short_json(value: Any, limit: int = 80) -> str | None:
    """``value`` as JSON text (bytes read as UTF-8, anything JSON has no form for as its ``str``), cut to ``limit``
    characters: a refused body is never echoed whole."""
    if value is MISSING:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):  # (a body nested deeper than the encoder goes: what json.loads took)
        text = "(nested too deep to show)"
    return cut(text, limit)


class _Twice(dict):
    """An object of a request body that gives ``key`` twice ({"history": [1], "history": [2]}: which one was meant is
    not ours to guess); found again after the parse, to name where it is."""

    key = ""


def _unique_keys(pairs: list[tuple[str, Any]], found: list[_Twice]) -> dict[str, Any]:
    if (key := repeated_key(pairs)) is None:
        return dict(pairs)
    twice = _Twice(pairs)
    twice.key = key
    found.append(twice)
    return twice


def _first_in(doc: Any, targets: list[_Twice]) -> tuple[str, _Twice] | None:
    """The first of ``targets`` (in their order) still in ``doc``, and where it sits: "" (the body itself) or a path
    such as ``histories[2].a``; None where none is (each replaced by a value of a key given twice further out). One
    walk over the body, whatever the count of targets (one walk per target was quadratic: a 160 KB body of many
    repeated keys held the event loop for 40 s)."""
    rank = {id(t): i for i, t in enumerate(targets)}
    seen: list[tuple[Any, int, Any]] = [(doc, -1, None)]  # (object or list, its parent's entry, its key there)
    stack, best = [0], None
    while stack:  # loop over the body's objects and lists, depth first
        i = stack.pop()
        node = seen[i][0]
        r = rank.get(id(node))
        best = (r, i) if r is not None and (best is None or r < best[0]) else best
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            if isinstance(v, dict | list):
                seen.append((v, i, k))
                stack.append(len(seen) - 1)
    if best is None:
        return None
    keys, i = [], best[1]
    while seen[i][1] >= 0:  # loop up the chain of parents
        keys.append(seen[i][2])
        i = seen[i][1]
    path = ""
    for k in reversed(keys):  # loop over the path's steps
        path = f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else k
    return path, targets[best[0]]


def parse_body(body: bytes, example: str = '{"history": [12, 45], "k": 10}') -> dict[str, Any]:
    """The JSON object of a request body; a 400 for malformed JSON, a key given twice in any of its objects (named
    with where it is), or anything else than an object (``example``: one the route takes)."""
    found: list[_Twice] = []
    try:
        doc = json.loads(body, object_pairs_hook=lambda pairs: _unique_keys(pairs, found))
    except json.JSONDecodeError as e:
        raise ApiError(400, "body", body[:60], "a JSON object", f"malformed JSON at line {e.lineno} column {e.colno}: "
                       f"{e.msg}") from None
    except (UnicodeDecodeError, RecursionError):
        raise ApiError(400, "body", body[:60], "a JSON object in UTF-8 text", "malformed JSON: not UTF-8 text, or nested "
                       "too deep") from None
    except ValueError:  # a number longer than Python reads (4,300 digits)
        raise ApiError(400, "body", body[:60], "a JSON object of ids and counts of ordinary size",
                       "a number of more than 4,300 digits: item ids and counts have at most 19") from None
    if found:  # innermost first; the first still in the body (an outer key given twice may have replaced one)
        where, twice = _first_in(doc, found)  # (the innermost is still in the body where no outer one replaced it)
        key = cut(f"{where}.{twice.key}" if where else twice.key)
        raise ApiError(400, key, key, "each key once", f"the key `{key}` is given twice in one object")
    if not isinstance(doc, dict):
        raise ApiError(400, "body", doc, f"a JSON object such as {example}")
    return doc


def check_fields(doc: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    for name in doc:
        if name not in allowed:
            raise ApiError(422, name, doc[name], f"one of the fields {list(allowed)}", f"unknown field `{cut(name)}`: "
                           f"the fields are {list(allowed)}")
    for name in required:
        if name not in doc:
            raise ApiError(422, name, MISSING, "present", f"missing field `{name}`")


def check_k(doc: dict[str, Any], rec: Recommender, limits: Limits) -> int:
    k = doc.get("k", 10)
    hi = min(limits.max_k, rec.run.ids.num_items)
    if not is_int(k) or not 1 <= k <= hi:
        raise ApiError(422, "k", k, f"an integer in [1, {hi}]")
    return k


def check_decoder(doc: dict[str, Any], rec: Recommender) -> str:
    name = doc.get("decoder", "auto")
    allowed = f"one of {['auto', *rec.decoders]}"
    if not isinstance(name, str):
        raise ApiError(422, "decoder", name, allowed)
    try:
        return rec.resolve(name)
    except ValueError:  # (its message lists every decoder semid has, not what this run serves)
        raise ApiError(422, "decoder", name, allowed, f"`decoder` {short_json(name)} is not served here: this service "
                       f"serves {allowed}") from None


def check_exclude(doc: dict[str, Any]) -> bool:
    value = doc.get("exclude_history", True)
    if not isinstance(value, bool):
        raise ApiError(422, "exclude_history", value, "true or false")
    return value


def check_user_ids(doc: dict[str, Any], rec: Recommender, batch: bool, n: int) -> list[int] | None:
    """``user_id`` (one history) or ``user_ids`` (one per history of a batch): ids >= 0 for a run trained with user
    tokens (T5 runs: hashed into its user buckets, as ``semid recommend --user``); None where none was sent, or sent
    as null (the API page's schema allows it, and generated clients send one). A run trained without user tokens
    refuses them (they would change nothing)."""
    field = "user_ids" if batch else "user_id"
    if doc.get(field) is None:
        return None
    value = doc[field]
    if not rec.run.use_user_tokens:
        raise ApiError(422, field, value, "no user id: this run was trained without user tokens, so a user id changes "
                       "nothing (only T5 runs trained with --user-tokens read one); leave it out")
    values = value if batch else [value]
    if batch and (not isinstance(value, list) or len(value) != n):
        raise ApiError(422, field, value, f"a list of {n} user ids (one per history, each an int >= 0)")
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
            where = f"{field}[{i}]" if batch else field
            raise ApiError(422, where, v, "a user id: an int >= 0 (below 2^63)")
    return [int(v) for v in values]


def check_history(value: Any, field: str, rec: Recommender, limits: Limits) -> np.ndarray:
    """A non-empty list of at most ``max_history`` known item ids, as int64 (H,)."""
    lo, hi = int(rec.run.ids.item_ids[0]), int(rec.run.ids.item_ids[-1])
    if not isinstance(value, list):
        raise ApiError(422, field, value, f"a list of item ids ({lo}..{hi})")
    if not value:
        raise ApiError(422, field, value, "a non-empty list of item ids", f"`{field}` is empty: a history needs at least one item")
    if len(value) > limits.max_history:
        raise ApiError(422, field, value, f"at most {limits.max_history} item ids",
                       f"`{field}` has {len(value)} items, more than the limit of {limits.max_history}: send the latest ones")
    if not all(map(is_int, value)):
        i = next(i for i, x in enumerate(value) if not is_int(x))
        raise ApiError(422, f"{field}[{i}]", value[i], f"an integer item id ({lo}..{hi})")
    if max(value) > hi or min(value) < lo:  # also keeps np.asarray from overflowing int64
        arr = np.asarray([x if lo <= x <= hi else lo - 1 for x in value], dtype=np.int64)
    else:
        arr = np.asarray(value, dtype=np.int64)
    ids = rec.run.ids.item_ids
    pos = np.clip(np.searchsorted(ids, arr), 0, len(ids) - 1)
    unknown = np.flatnonzero(ids[pos] != arr)
    if unknown.size:
        i = int(unknown[0])
        raise ApiError(422, f"{field}[{i}]", value[i], f"an item id of the catalogue ({lo}..{hi}, {len(ids)} items)",
                       f"`{field}[{i}]` is {short_json(value[i])}, not an item of the catalogue ({lo}..{hi}, {len(ids)} items)")
    return arr


def check_exclusion_fits(histories: list[np.ndarray], fields: list[str], k: int, rec: Recommender) -> None:
    """k plus the distinct items of a history to exclude must not exceed the catalogue."""
    N = rec.run.ids.num_items
    for h, field in zip(histories, fields, strict=True):
        distinct = len(np.unique(h))
        if k + distinct > N:
            fix = f"`k` of at most {N - distinct}" if N - distinct >= 1 else "a shorter history"
            raise ApiError(422, "k", k, f"{fix}, or \"exclude_history\": false", f"`k` ({k}) plus the {distinct} "
                           f"distinct items of `{field}` to exclude is more than the catalogue's {N} items: ask for "
                           f"{fix}, or rank the history's items too (\"exclude_history\": false)")


@dataclass(frozen=True)
class Query:
    """A checked request: histories (int64 arrays), k, the resolved decoder, the exclusion and the users' ids (None:
    none sent)."""

    histories: list[np.ndarray]
    k: int
    decoder: str
    exclude_history: bool
    user_ids: list[int] | None = None


ONE_FIELDS = ("history", "k", "decoder", "exclude_history", "user_id")
BATCH_FIELDS = ("histories", "k", "decoder", "exclude_history", "user_ids")


def parse_query(doc: dict[str, Any], rec: Recommender, limits: Limits, *, batch: bool) -> Query:
    """Check a /recommend (``batch=False``) or /recommend/batch body against the served ``rec``."""
    check_fields(doc, BATCH_FIELDS if batch else ONE_FIELDS, ("histories",) if batch else ("history",))
    k, decoder, exclude = check_k(doc, rec, limits), check_decoder(doc, rec), check_exclude(doc)
    if batch:
        many = doc["histories"]
        if not isinstance(many, list) or not many:
            raise ApiError(422, "histories", many, "a non-empty list of histories (lists of item ids)")
        if len(many) > limits.max_batch_histories:
            raise ApiError(422, "histories", many, f"at most {limits.max_batch_histories} histories", f"`histories` has "
                           f"{len(many)} histories, more than the limit of {limits.max_batch_histories}: send them in parts")
        fields = [f"histories[{i}]" for i in range(len(many))]
        histories = [check_history(h, f, rec, limits) for h, f in zip(many, fields, strict=True)]
    else:
        fields = ["history"]
        histories = [check_history(doc["history"], "history", rec, limits)]
    if exclude:
        check_exclusion_fits(histories, fields, k, rec)
    return Query(histories, k, decoder, exclude, check_user_ids(doc, rec, batch, len(histories)))

"""The oracle service's wire format: what a request holds, checked before it reaches the oracle.

Both ends speak msgpack over HTTP POST:

    POST /reward   {"id", "token", "prompts", "completions", "references", "columns"}
                -> {"id", "scores", "components", "metrics"}  or  {"id", "error"}
    POST /compare  {"id", "token", "prompts", "completions_a", "completions_b", "references", "columns"}
                -> {"id", "probabilities", "metrics"}          or  {"id", "error"}
    POST /health   (any body) -> {"status": "ok", "rewards", "worker"}

`id` is the client's name for the request, echoed back so a reply is matched to the chunk it answers.
`token` carries the bearer token in the body as well as in the `Authorization` header: Mosec (0.9.8)
passes only the body to its Python workers, so the body is where the service can check it.

Pure Python, no Mosec and no torch: the client and the server's ingress stage both import it.
"""
from __future__ import annotations

import hmac
from typing import Any

OPS = ("reward", "compare", "health")
"""the service's operations; each has its own route, `/<op>`"""

_TEXT_FIELDS = {"reward": ("prompts", "completions"), "compare": ("prompts", "completions_a", "completions_b")}


class RequestError(ValueError):
    """A request the service refuses: its message says what was wrong and what to send instead."""


class AuthError(RequestError):
    """A request without the service's token, or with a wrong one."""


def check_token(request: Any, expected: str | None) -> None:
    """Raise AuthError unless `request` carries `expected` (nothing to check when it is None).

    Compared in constant time, so the reply's timing does not leak how much of a guess was right."""
    if not expected:
        return
    sent = request.get("token") if isinstance(request, dict) else None
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise AuthError("unauthorized: this oracle service needs a token; set the client's token environment "
                        "variable (--oracle.remote.token-env, default WINNOW_ORACLE_TOKEN) to the server's token")


def validate(request: Any, op: str, max_items: int) -> dict[str, Any]:
    """`request` as a clean dict for `op` ("reward" or "compare"), lists in place of msgpack's tuples.

    Raises RequestError naming the first problem: a missing or mistyped field, lists of different
    lengths, no items, or more than `max_items` items (split the call into smaller requests)."""
    if not isinstance(request, dict):
        raise RequestError(f"the body must be a msgpack map with fields {_fields(op)}, got {type(request).__name__}")
    request_id = request.get("id")
    if not isinstance(request_id, (str, int)):
        raise RequestError("field 'id' (a string naming the request, echoed in the reply) is missing")
    clean: dict[str, Any] = {"op": op, "id": request_id}
    for name in _TEXT_FIELDS[op]:
        clean[name] = _strings(request, name, allow_none=False)
    n = len(clean["prompts"])
    if n == 0:
        raise RequestError("the request has no items; send at least one completion")
    if n > max_items:
        raise RequestError(f"{n} items in one request, over this service's limit of {max_items}; split the call "
                           f"(client: --oracle.remote.request-batch-size {max_items} or less)")
    references = request.get("references")
    clean["references"] = [None] * n if references is None else _strings(request, "references", allow_none=True)
    columns = request.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) for k in columns):
        raise RequestError("field 'columns' must map column names to lists, one value per item")
    clean["columns"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in columns.items()}
    lengths = {name: len(clean[name]) for name in (*_TEXT_FIELDS[op], "references")}
    for key, values in clean["columns"].items():
        if not isinstance(values, list):
            raise RequestError(f"column {key!r} must be a list with one value per item, got {type(values).__name__}")
        lengths[f"column {key!r}"] = len(values)
    wrong = {k: v for k, v in lengths.items() if v != n}
    if wrong:
        raise RequestError(f"{n} prompts but {wrong}: every field needs one entry per item")
    return clean


def _strings(request: dict, name: str, allow_none: bool) -> list:
    values = request.get(name)
    if not isinstance(values, (list, tuple)):
        raise RequestError(f"field {name!r} must be a list of strings, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not (isinstance(value, str) or (allow_none and value is None)):
            kind = "a string or nil" if allow_none else "a string"
            raise RequestError(f"{name}[{i}] must be {kind}, got {type(value).__name__}")
    return list(values)


def _fields(op: str) -> str:
    return ", ".join(("id", "token", *_TEXT_FIELDS.get(op, ()), "references", "columns"))

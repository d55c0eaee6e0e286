"""Request validation for `megatron-rl serve` (rollout/cpu_server.py): every JSON body is checked before the
server acts on it, and a bad one is an HTTPError (400) whose message starts with the name of the offending field.

`fields(body, required, optional)` takes each endpoint's accepted fields by kind (a key of _KINDS: a check and the
phrase that says what it expects), with a default for each optional one. The first unknown field, missing required
one or value of the wrong kind is refused:

    unknown field(s) 'x'; accepted: input_ids, sampling_params, ...
    model_path: missing (required, a non-empty string)
    mode: expected a non-empty string, got 3

`int_list` and `str_list` check a list field the same way (shapes[1]: expected a list of integers >= 0, got ...),
and the server's own checks follow the pattern (input_ids[2]: token id 70000 is not an integer in [0, 32000)).
ROUTER_DEFAULTS are the fields sglang-router adds to every /generate, accepted at their default values only.
"""

from collections.abc import Callable

from megatron_rl.rollout.flat_bucket import LOAD_FORMAT
from megatron_rl.rollout.hf_engine import is_int


class HTTPError(Exception):
    """An answer other than 200: the status, and the message sent as {"success": false, "message": ...}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


_KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (is_int, "an integer"),
    "port": (lambda v: is_int(v) and 0 < v < 65536, "a port number (1-65535)"),
    "version": (lambda v: v is None or isinstance(v, str | int) and not isinstance(v, bool) and str(v) != "",
                "a non-empty string or null"),
    "null": (lambda v: v is None, "null (the only value this server supports)"),
    "load_format": (lambda v: v is None or v == LOAD_FORMAT,
                    f"null (one broadcast per tensor) or {LOAD_FORMAT!r} (one uint8 broadcast of all their bytes)"),
    "false": (lambda v: v is False, "false (the only value this server supports)"),
    "any": (lambda v: True, ""),
}


# Fields of SGLang's GenerateReqInput that sglang-router always forwards: accepted at these values only.
ROUTER_DEFAULTS = {"model": ("any", None), "log_metrics": ("bool", True), "no_logs": ("bool", False),
                   **{name: ("false", False) for name in ("return_text_in_logprobs", "return_hidden_states",
                                                          "background", "return_bytes", "return_entropy")}}


def fields(body: dict, required: dict[str, str], optional: dict[str, tuple[str, object]]) -> dict:
    """The body's fields, checked: `required` name -> kind, `optional` name -> (kind, default); 400 naming the
    first unknown, missing or ill-typed field."""
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise HTTPError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: "
                             f"{', '.join([*required, *optional]) or 'none'}")
    values = {}
    for name, kind in required.items():
        if name not in body:
            raise HTTPError(400, f"{name}: missing (required, {_KINDS[kind][1]})")
        values[name] = body[name]
    for name, (_, default) in optional.items():
        values[name] = body.get(name, default)
    for name, value in values.items():
        kind = required.get(name) or optional[name][0]
        if name in body and not _KINDS[kind][0](value):
            raise HTTPError(400, f"{name}: expected {_KINDS[kind][1]}, got {value!r:.100}")
    return values


def int_list(value, name: str, minimum: int = 0) -> list[int]:
    if not isinstance(value, list) or not all(is_int(v) and v >= minimum for v in value):
        raise HTTPError(400, f"{name}: expected a list of integers >= {minimum}, got {value!r:.100}")
    return value


def str_list(value, name: str, length: int | None = None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise HTTPError(400, f"{name}: expected a list of non-empty strings, got {value!r:.100}")
    if length is not None and len(value) != length:
        raise HTTPError(400, f"{name}: expected {length} entries (one per entry of names), got {len(value)}")
    return value


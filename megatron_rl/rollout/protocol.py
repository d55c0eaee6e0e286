"""The rollout contract: an HTTP client for SGLang's native API (0.5.23), spoken by real SGLang servers and
by `megatron-rl serve` (rollout/cpu_server.py).

    client = EngineClient("http://127.0.0.1:30000", token=token)
    generation = client.generate([151644, 872, 198], {"temperature": 1.0, "max_new_tokens": 64}, rid="r0")
    generation.output_ids, generation.output_logprobs, generation.finish_reason, generation.weight_version

Wire format (JSON; field names are SGLang's):

    POST /generate {input_ids: [int] | [[int]], sampling_params: {} | [{}], return_logprob, rid: str | [str]}
      -> {output_ids, meta_info: {id, finish_reason, prompt_tokens, completion_tokens, weight_version,
                                  output_token_logprobs: [[logprob, token_id, null], ...]}}  (a list for a batch)
      finish_reason: {"type": "stop", "matched": id} | {"type": "length", "length": n} | {"type": "abort", "message"}
      logprob = log_softmax(logits / temperature)[token], before top-k / top-p (log_softmax(logits) when greedy)
    GET  /health, /health_generate (200 or 503)        GET /get_model_info -> {weight_version, model_path, ...}
    POST /flush_cache, /pause_generation {mode: abort | retract | in_place}, /continue_generation {},
         /abort_request {rid, abort_all}
    POST /init_weights_update_group {master_address, master_port, rank_offset, world_size, group_name, backend}
         /destroy_weights_update_group {group_name}
         /begin_weight_update {}, /end_weight_update {}      (required around from_distributed / from_tensor)
         /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache, weight_version,
                                           load_format: null | "flattened_bucket"}
         /update_weights_from_disk {model_path, weight_version, flush_cache}
         /update_weights_from_tensor {safetensors: base64 of a safetensors file, flush_cache, weight_version}
         /get_weights_by_name {name, truncate_size} -> the parameter's first values
      -> {success, message} (200, or 400 with success false)

/update_weights_from_tensor is where we differ from SGLang on purpose: SGLang's payload
(`serialized_named_tensors`) is a pickle (torch's ForkingPickler), which runs code of the sender's
choosing on load; ours is a safetensors file (tensors and a JSON header, nothing executable). Real
SGLang answers it 400 (the field it requires is missing) and our server refuses SGLang's pickle.

Auth: `Authorization: Bearer <token>` (SGLang's --api-key). Errors: every failure (connection, timeout,
HTTP status other than 200, `success: false`, a malformed answer) raises EngineError. The client is
thread-safe: each call opens its own connection.
"""

import base64
import http.client
import json
import socket
import urllib.parse
from dataclasses import dataclass, field

import torch
from safetensors.torch import save


class EngineError(RuntimeError):
    """A call to an engine failed: which engine, which endpoint, the HTTP status (None: no answer) and why."""

    def __init__(self, url: str, endpoint: str, status: int | None, message: str):
        self.url, self.endpoint, self.status, self.message = url, endpoint, status, message
        super().__init__(f"{url}{endpoint}: " + (f"HTTP {status}: " if status is not None else "") + message)


@dataclass(frozen=True)
class Generation:
    """One answered prompt. output_logprobs[t] is the logprob of output_ids[t] (see the module docstring);
    weight_versions lists (version, start, end): output tokens [start, end) came from that version
    (more than one entry only if the weights changed while the request was held by an in-place pause)."""

    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float] | None  # None when requested with return_logprob=False
    finish_reason: dict
    weight_version: str
    rid: str | None = None
    weight_versions: list[tuple[str, int, int]] = field(default_factory=list)


class EngineClient:
    """Calls one engine's endpoints. `timeout` (seconds) bounds each call, a generation included."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/"):
            raise ValueError(f"engine url must look like http://host:port, got {url!r}")
        self.url = f"{parsed.scheme}://{parsed.netloc}"
        self.token, self.timeout = token, timeout
        self._connection_class = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        self._netloc = parsed.netloc

    # --- generation -------------------------------------------------------------------------------------

    def generate(self, input_ids: list[int], sampling_params: dict, *, rid: str | None = None,
                 return_logprob: bool = True) -> Generation:
        """One prompt (token ids) -> its Generation."""
        body = {"input_ids": list(input_ids), "sampling_params": sampling_params, "return_logprob": return_logprob}
        if rid is not None:
            body["rid"] = rid
        answer = self._call("POST", "/generate", body)
        return self._generation(list(input_ids), answer, return_logprob)

    def generate_batch(self, prompts: list[list[int]], sampling_params: dict | list[dict], *,
                       rids: list[str] | None = None, return_logprob: bool = True) -> list[Generation]:
        """Several prompts in one request (one sampling_params for all, or one each) -> a Generation each, in order."""
        body = {"input_ids": [list(p) for p in prompts], "sampling_params": sampling_params,
                "return_logprob": return_logprob}
        if rids is not None:
            body["rid"] = list(rids)
        answer = self._call("POST", "/generate", body)
        if not isinstance(answer, list) or len(answer) != len(prompts):
            raise EngineError(self.url, "/generate", 200,
                              f"expected a list of {len(prompts)} results, got {answer!r:.200}")
        return [self._generation(list(p), item, return_logprob) for p, item in zip(prompts, answer, strict=True)]

    def _generation(self, prompt_ids: list[int], answer, return_logprob: bool) -> Generation:
        try:
            meta = answer["meta_info"]
            output_ids = [int(t) for t in answer["output_ids"]]
            logprobs = None
            if return_logprob:
                entries = meta.get("output_token_logprobs") or []  # absent when aborted before any token
                if [int(entry[1]) for entry in entries] != output_ids:
                    raise ValueError("output_token_logprobs token ids differ from output_ids")
                logprobs = [float(entry[0]) for entry in entries]
            version = str(meta["weight_version"])
            spans = [(str(s["version"]), int(s["start"]), int(s["end"])) for s in meta.get("weight_versions") or []]
            return Generation(prompt_ids, output_ids, logprobs, dict(meta["finish_reason"]), version,
                              meta.get("id"), spans or [(version, 0, len(output_ids))])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise EngineError(self.url, "/generate", 200, f"malformed answer ({exc}): {answer!r:.300}") from exc

    # --- health and scheduling -----------------------------------------------------------------------------

    def health(self) -> bool:
        """The server process is up and answers."""
        return self._ok("GET", "/health")

    def health_generate(self) -> bool:
        """The server generates (it runs a one-token generation)."""
        return self._ok("GET", "/health_generate")

    def flush_cache(self, wait_seconds: float = 0.0) -> None:
        """Empty the prefix cache. SGLang refuses (400) while requests run or wait; wait_seconds > 0 lets it wait
        up to that long for them to finish (its ?timeout=)."""
        self._call("POST", f"/flush_cache?timeout={wait_seconds:g}" if wait_seconds > 0 else "/flush_cache", {})

    def pause_generation(self, mode: str = "abort") -> None:
        """abort: in-flight requests end with finish_reason abort; in_place / retract: they wait for continue.
        New requests wait until continue_generation in every mode."""
        self._call("POST", "/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self._call("POST", "/continue_generation", {})

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> None:
        """End request `rid` (or every request) with finish_reason abort."""
        if not rid and not abort_all:
            raise ValueError("abort_request needs a rid or abort_all=True")
        self._call("POST", "/abort_request", {"rid": rid or "", "abort_all": abort_all})

    # --- weights ---------------------------------------------------------------------------------------

    def get_weight_version(self) -> str:
        """From /get_model_info: SGLang 0.5.23 has no /get_weight_version (and calls /get_model_info deprecated
        for /model_info, which `megatron-rl serve` does not serve yet)."""
        return str(self._call("GET", "/get_model_info")["weight_version"])

    def begin_weight_update(self) -> None:
        self._call("POST", "/begin_weight_update", {})

    def end_weight_update(self) -> None:
        self._call("POST", "/end_weight_update", {})

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "gloo") -> None:
        """Blocks until every rank joined: call it from a thread while this process joins as rank 0
        (process_group.init_custom_process_group)."""
        self._call("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        self._call("POST", "/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "weight_update_group", weight_version: str | None = None,
                                        flush_cache: bool = True, load_format: str | None = None) -> None:
        """Blocks until the engine received every tensor: call it from a thread while rank 0 broadcasts
        them, in this order, over the group (dtypes like "float32", "bfloat16"); with load_format
        "flattened_bucket", one uint8 tensor holding them all (rollout/flat_bucket.py)."""
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        if load_format is not None:
            body["load_format"] = load_format
        self._call("POST", "/update_weights_from_distributed", body)

    def update_weights_from_tensor(self, named_tensors: list[tuple[str, torch.Tensor]],
                                   weight_version: str | None = None, flush_cache: bool = True) -> None:
        """Send the tensors in the request as a base64 safetensors file (our server only; see the module docstring)."""
        payload = save({name: tensor.detach().cpu().contiguous() for name, tensor in named_tensors})
        body = {"safetensors": base64.b64encode(payload).decode("ascii"), "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        self._call("POST", "/update_weights_from_tensor", body)

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                 flush_cache: bool = True) -> None:
        """Load the safetensors of a Hugging Face checkpoint directory on the engine's machine.
        flush_cache=False while requests are held by an in-place pause: SGLang cannot flush then, and answers 400
        (having loaded the weights)."""
        body = {"model_path": model_path, "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = weight_version
        self._call("POST", "/update_weights_from_disk", body)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[float]:
        """The first `truncate_size` values of the flattened parameter `name` (HF name)."""
        answer = self._call("POST", "/get_weights_by_name", {"name": name, "truncate_size": truncate_size})
        values = _flatten(answer)
        return values[:truncate_size]

    # --- transport -------------------------------------------------------------------------------------

    def _ok(self, method: str, endpoint: str) -> bool:
        try:
            self._call(method, endpoint)
        except EngineError:
            return False
        return True

    def _call(self, method: str, endpoint: str, body: dict | None = None):
        """The decoded JSON answer (None for an empty body, the text for a non-JSON body); EngineError otherwise."""
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        connection = self._connection_class(self._netloc, timeout=self.timeout)
        try:
            connection.request(method, endpoint, body=data, headers=headers)
            response = connection.getresponse()
            status, raw = response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out (socket.timeout is an OSError)
            reason = "timed out" if isinstance(exc, socket.timeout) else f"{type(exc).__name__}: {exc}"
            raise EngineError(self.url, endpoint, None, reason) from exc
        finally:
            connection.close()
        text = raw.decode("utf-8", errors="replace")
        try:
            answer = json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            answer = text
        if status != 200:
            raise EngineError(self.url, endpoint, status, _message_of(answer))
        if isinstance(answer, dict) and answer.get("success") is False:
            raise EngineError(self.url, endpoint, status, _message_of(answer))
        return answer


def _message_of(answer) -> str:
    """The reason in an error answer: ours / SGLang's {message}, FastAPI's {detail}, OpenAI's {error: {message}}."""
    if isinstance(answer, dict):
        for key in ("message", "detail", "error"):
            value = answer.get(key)
            if isinstance(value, dict):
                value = value.get("message", value)
            if value:
                return str(value)
    return str(answer)[:1000] if answer is not None else "(empty answer)"


def _flatten(values) -> list[float]:
    if isinstance(values, list):
        return [x for item in values for x in _flatten(item)]
    return [float(values)]

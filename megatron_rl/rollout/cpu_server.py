"""`megatron-rl serve`: a CPU rollout server that speaks SGLang's native HTTP API (rollout/protocol.py),
backed by HFGenerator (real generation, real logprobs, real weight loading).

    megatron-rl serve --model-path DIR [--host 127.0.0.1] [--port 30000] [--dtype float32|bfloat16]
                      [--max-batch-size 64] [--threads N]          token: env MEGATRON_RL_SERVE_TOKEN or --token
                      [--logit-noise-std S] [--logit-noise-seed K]

--dtype is the dtype of the served weights and of the forward (logits are cast to float32 for the logprobs).
--logit-noise-std S > 0 (default 0: off) adds S * eps_t, eps_t ~ N(0, I) over the vocabulary, to the tempered
logits of every decode step before the logprob and the sampling: the engine's behaviour policy becomes
mu_t = softmax(logits_t / T + S * eps_t), a train-inference mismatch of known size. eps_t is a function of
(--logit-noise-seed K, the request's sampling_seed, the output position t) only, so a seeded request gets the same
noise in any batch (rollout/logit_noise.py has the formula).

Generation (rollout/serve_scheduler.py runs it): /generate requests are queued and run in batches of up to
--max-batch-size. /pause_generation {mode: abort} aborts queued and running requests (finish_reason abort, 200);
{mode: in_place | retract} holds the running batch; in every mode new requests wait until /continue_generation.
/abort_request {rid | abort_all} ends the request(s); the other requests of a running batch start over.
Weights change only while no batch computes: /begin_weight_update waits for the running batch to
finish (or be held) and starts none until /end_weight_update (begin is idempotent, so a restarted
trainer can reopen its session; end without a session is a 400). /update_weights_from_distributed and
/update_weights_from_tensor must run inside that session (SGLang 0.5.23's rule, 400 otherwise);
/update_weights_from_disk may run outside one, as in SGLang (it is one call: it waits for the running
batch, loads, and generation goes on). Every update receives or reads all tensors first and copies them
only when all are valid (HFGenerator.load_weights), cast to the model's dtype, then sets weight_version.
/update_weights_from_distributed takes SGLang's load_format: null receives one broadcast per tensor;
"flattened_bucket" receives one uint8 broadcast holding every tensor's bytes back to back in the order of names,
each at a byte offset that is a multiple of its itemsize (rollout/flat_bucket.py; an unaligned layout or a
negative dimension is a 400 before anything is received); any other value is a 400.
Each generation reports the weight_version its last token came from, and weight_versions
[{version, start, end}] over its output tokens (several only when an update happened while it was held).
Every request body is checked first (rollout/serve_fields.py): a 400 names the unknown, missing or ill-typed field.

Security: binds 127.0.0.1 unless --host says otherwise. A token is required to start (else the
server refuses, exit code 2); `--no-token` serves without one and is accepted on a loopback address
only. With a token, `Authorization: Bearer <token>` is required by every admin endpoint (weights,
pause, abort, flush), and by /generate, /get_weight_version and /get_model_info (alias /model_info) too
when bound to a non-loopback address; /health and /health_generate are open, as in SGLang. 401: no
token, 403: a wrong one. /update_weights_from_tensor takes a base64 safetensors file, never SGLang's pickle.
Behind sglang-router: /generate accepts the GenerateReqInput fields the router adds (model,
log_metrics, no_logs, and return_hidden_states / return_entropy / return_bytes / background /
return_text_in_logprobs at false), and the router passes the client's Authorization header on.

Not implemented: text prompts, streaming, prompt logprobs, top logprobs, n > 1, a prefix cache
(/flush_cache answers 200 with nothing to flush), aborting a request whose client disconnected.
A /health_generate while generation is paused answers 503 at once.
"""

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import safe_open

from megatron_rl.rollout.flat_bucket import LOAD_FORMAT, byte_offsets, unflatten
from megatron_rl.rollout.hf_engine import HFGenerator, SamplingParams, eos_token_ids, is_int, load_hf_model
from megatron_rl.rollout.logit_noise import LogitNoise
from megatron_rl.rollout.parent_watchdog import PARENT_ENV
from megatron_rl.rollout.process_group import destroy_custom_process_group, init_custom_process_group
from megatron_rl.rollout.serve_fields import ROUTER_DEFAULTS, HTTPError, fields, int_list, str_list
from megatron_rl.rollout.serve_scheduler import PAUSE_MODES, Request, Scheduler

TOKEN_ENV = "MEGATRON_RL_SERVE_TOKEN"
EXIT_USAGE = 2
DEFAULT_GROUP = "weight_update_group"
GROUP_TIMEOUT = timedelta(minutes=10)  # rendezvous and each receive of a weight-update group
HEALTH_TIMEOUT = 20.0  # seconds /health_generate waits for its one-token generation (SGLang's default)
MAX_BODY = {"open": 1 << 20, "reader": 64 << 20, "admin": 64 << 30}  # bytes of a request body, by access
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

log = logging.getLogger("megatron_rl.serve")


# --- the endpoints -------------------------------------------------------------------------------------

class Server:
    """The endpoints (method name = path) over one HFGenerator and its Scheduler."""

    def __init__(self, generator: HFGenerator, model_path: str, token: str | None, loopback: bool):
        self.generator, self.model_path, self.token, self.loopback = generator, model_path, token, loopback
        self.scheduler = Scheduler(generator)
        self.groups: dict[str, dist.ProcessGroup] = {}
        self._groups_lock = threading.Lock()

    # generation

    def generate(self, body: dict) -> dict | list:
        if "text" in body:
            raise HTTPError(400, "text: not supported (this server takes token ids): send input_ids")
        f = fields(body, {"input_ids": "any"}, {"sampling_params": ("any", None), "return_logprob": (
            "bool", False), "rid": ("any", None), "stream": ("false", False), **ROUTER_DEFAULTS})
        requests, single = self._requests(f["input_ids"], f["sampling_params"], f["rid"])
        start = time.perf_counter()
        self.scheduler.submit(requests)
        self.scheduler.wait(requests)
        answers = [self._answer(r, f["return_logprob"], time.perf_counter() - start) for r in requests]
        return answers[0] if single else answers

    def _requests(self, input_ids, sampling_params, rid) -> tuple[list[Request], bool]:
        single = isinstance(input_ids, list) and bool(input_ids) and not isinstance(input_ids[0], list)
        prompts = [input_ids] if single else input_ids
        if not isinstance(prompts, list) or not prompts:
            raise HTTPError(400, f"input_ids: expected a list of token ids or a non-empty list of them, "
                                 f"got {input_ids!r:.100}")
        names = ["input_ids"] if single else [f"input_ids[{i}]" for i in range(len(prompts))]
        if isinstance(sampling_params, list):
            if single or len(sampling_params) != len(prompts):
                raise HTTPError(400, f"sampling_params: a list needs one entry per prompt ({len(prompts)}), "
                                     f"got {len(sampling_params)}")
            params = [self._params(p, f"sampling_params[{i}]") for i, p in enumerate(sampling_params)]
        else:
            shared = self._params({} if sampling_params is None else sampling_params, "sampling_params")
            params = [shared] * len(prompts)
        for name, prompt, sampling in zip(names, prompts, params, strict=True):
            self._check_prompt(name, prompt, sampling)
        if rid is None:
            rids = [uuid.uuid4().hex for _ in prompts]
        elif single and isinstance(rid, str) and rid:
            rids = [rid]
        elif not single and isinstance(rid, list) and len(rid) == len(prompts) and all(
                isinstance(r, str) and r for r in rid):
            rids = rid
        else:
            raise HTTPError(400, f"rid: expected {'a non-empty string' if single else f'a list of {len(prompts)} '
                                 'non-empty strings (one per prompt)'} or null, got {rid!r:.100}")
        return [Request(p, s, r) for p, s, r in zip(prompts, params, rids, strict=True)], single

    @staticmethod
    def _params(value, name: str) -> SamplingParams:
        try:
            return SamplingParams.from_dict(value)
        except (ValueError, TypeError) as exc:
            raise HTTPError(400, str(exc).replace("sampling_params", name, 1)) from exc

    def _check_prompt(self, name: str, prompt, params: SamplingParams) -> None:
        vocab, context = self.generator.vocab_size, self.generator.context_length
        if not isinstance(prompt, list) or not prompt:
            raise HTTPError(400, f"{name}: expected a non-empty list of token ids, got {prompt!r:.100}")
        bad = next((t for t in prompt if not (is_int(t) and 0 <= t < vocab)), None)
        if bad is not None:
            raise HTTPError(400, f"{name}: token id {bad!r} is not an integer in [0, {vocab})")
        if context is not None and len(prompt) + params.max_new_tokens > context:
            raise HTTPError(400, f"{name}: {len(prompt)} prompt tokens + max_new_tokens {params.max_new_tokens} "
                                 f"exceed the model's context length {context}")

    def _answer(self, request: Request, return_logprob: bool, seconds: float) -> dict:
        if request.error is not None:
            raise HTTPError(500, request.error)
        completion = request.completion
        n = len(completion.output_ids)
        spans = request.spans or [(self.scheduler.weight_version, 0)]
        ends = [start for _, start in spans[1:]] + [n]
        versions = [{"version": v, "start": s, "end": min(e, n)}
                    for (v, s), e in zip(spans, ends, strict=True) if s < n]
        meta = {"id": request.rid, "finish_reason": completion.finish_reason, "prompt_tokens": len(request.prompt),
                "completion_tokens": n, "cached_tokens": 0,
                "weight_version": versions[-1]["version"] if versions else spans[0][0],
                "weight_versions": versions, "e2e_latency": seconds}
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in
                                             zip(completion.output_logprobs, completion.output_ids, strict=True)]
        return {"output_ids": completion.output_ids, "meta_info": meta}

    # health and scheduling

    def health(self, body: dict) -> None:
        return None

    def health_generate(self, body: dict) -> None:
        """200 once a one-token generation ran, or the running batch made a step; 503 while generation is paused."""
        if self.scheduler.pause_mode is not None or self.scheduler.session:
            raise HTTPError(503, "generation is paused (pause_generation or a weight update session)")
        probe = Request([0], SamplingParams(temperature=0.0, max_new_tokens=1), f"HEALTH_CHECK_{uuid.uuid4().hex}")
        since = time.monotonic()
        self.scheduler.submit([probe])
        answered = False
        while not answered and time.monotonic() < since + HEALTH_TIMEOUT:  # polled: steps do not notify
            answered = self.scheduler.wait([probe], 0.05) or self.scheduler.last_step > since
        self.scheduler.withdraw(probe)
        if not answered or probe.error is not None:
            raise HTTPError(503, probe.error or f"no generation step within {HEALTH_TIMEOUT:.0f} s")
        return None

    def flush_cache(self, body: dict) -> str:
        fields(body, {}, {})
        return "Cache flushed.\nThis server keeps no prefix cache: nothing to flush.\n"

    def pause_generation(self, body: dict) -> dict:
        mode = fields(body, {}, {"mode": ("str", "abort")})["mode"]
        if mode not in PAUSE_MODES:
            raise HTTPError(400, f"mode: expected one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        self.scheduler.pause(mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body: dict) -> dict:
        fields(body, {}, {"torch_empty_cache": ("bool", True)})
        self.scheduler.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def abort_request(self, body: dict) -> None:
        f = fields(body, {}, {"rid": ("any", ""), "abort_all": ("bool", False)})
        rid = f["rid"]
        if not isinstance(rid, str | None) or (not rid and not f["abort_all"]):
            raise HTTPError(400, f"rid: expected a non-empty string (or abort_all: true), got {rid!r:.100}")
        self.scheduler.abort(rid, f["abort_all"])

    # weights

    def get_weight_version(self, body: dict) -> dict:
        return {"weight_version": self.scheduler.weight_version}

    def get_model_info(self, body: dict) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                "weight_version": self.scheduler.weight_version}

    model_info = get_model_info  # SGLang's newer name, which sglang-router asks first

    def get_weights_by_name(self, body: dict) -> list[float]:
        f = fields(body, {"name": "str"}, {"truncate_size": ("int", 100)})
        with self.scheduler.weights_lock:
            try:
                return self.generator.weights_by_name(f["name"], f["truncate_size"])
            except (KeyError, ValueError) as exc:
                field_name = "name" if isinstance(exc, KeyError) else "truncate_size"
                raise HTTPError(400, f"{field_name}: {exc.args[0]}") from exc

    def begin_weight_update(self, body: dict) -> dict:
        fields(body, {}, {"selector": ("any", None)})
        opened = self.scheduler.begin_session()  # idempotent: a restarted trainer may find its session open
        return {"success": True, "message": "Weight update session " + ("begun" if opened else "was open already")
                + ": no batch runs until end_weight_update."}

    def end_weight_update(self, body: dict) -> dict:
        fields(body, {}, {})
        if not self.scheduler.end_session():
            raise HTTPError(400, "no weight update session is open (call /begin_weight_update first)")
        return {"success": True, "message": "Weight update session ended."}

    def init_weights_update_group(self, body: dict) -> dict:
        f = fields(body, {"master_address": "str", "master_port": "port", "rank_offset": "int", "world_size": "int"},
                    {"group_name": ("str", DEFAULT_GROUP), "backend": ("str", "nccl")})
        if f["backend"] != "gloo":
            raise HTTPError(400, f"backend: this CPU server supports 'gloo' only, got {f['backend']!r} "
                                 "(SGLang's default is nccl: pass backend 'gloo')")
        if not 1 <= f["rank_offset"] < f["world_size"]:
            raise HTTPError(400, f"rank_offset: expected an integer in [1, world_size={f['world_size']}) "
                                 f"(rank 0 is the sender), got {f['rank_offset']}")
        with self._groups_lock:
            if f["group_name"] in self.groups:
                raise HTTPError(400, f"group_name: a group {f['group_name']!r} exists already "
                                     "(destroy_weights_update_group first)")
            try:
                self.groups[f["group_name"]] = init_custom_process_group(
                    "gloo", f"tcp://{f['master_address']}:{f['master_port']}", f["world_size"], f["rank_offset"],
                    f["group_name"], timeout=GROUP_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - rendezvous failures come as several types
                raise HTTPError(400, f"Failed to initialize custom process group: {type(exc).__name__}: {exc}") from exc
        log.info("joined weight-update group %r as rank %d of %d", f["group_name"], f["rank_offset"], f["world_size"])
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_weights_update_group(self, body: dict) -> dict:
        name = fields(body, {}, {"group_name": ("str", DEFAULT_GROUP)})["group_name"]
        with self._groups_lock:
            group = self.groups.pop(name, None)
            if group is None:
                raise HTTPError(400, f"group_name: no group {name!r} (known: {', '.join(self.groups) or 'none'})")
            destroy_custom_process_group(group)
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    def update_weights_from_distributed(self, body: dict) -> dict:
        f = fields(body, {"names": "any", "dtypes": "any", "shapes": "any"}, {
            "group_name": ("str", DEFAULT_GROUP), "weight_version": ("version", None), "flush_cache": ("bool", True),
            "abort_all_requests": ("bool", False), "load_format": ("load_format", None)})
        self._require_session("update_weights_from_distributed")
        names = str_list(f["names"], "names")
        dtypes = [self._dtype(d, f"dtypes[{i}]") for i, d in enumerate(str_list(f["dtypes"], "dtypes", len(names)))]
        if not isinstance(f["shapes"], list) or len(f["shapes"]) != len(names):
            raise HTTPError(400, f"shapes: expected {len(names)} shapes (one per entry of names), "
                                 f"got {f['shapes']!r:.100}")
        shapes = [int_list(s, f"shapes[{i}]") for i, s in enumerate(f["shapes"])]
        tensors = self._receive(f["group_name"], names, dtypes, shapes, f["load_format"] == LOAD_FORMAT)
        self._load(tensors, f["weight_version"], f["abort_all_requests"], "update_weights_from_distributed")
        return {"success": True, "message": "Succeeded to update parameter online."}

    def _receive(self, group_name: str, names: list[str], dtypes: list[torch.dtype], shapes: list[list[int]],
                 flattened: bool) -> list[tuple[str, torch.Tensor]]:
        """The tensors broadcast by rank 0 of the group: one broadcast per tensor, or (flattened) one uint8
        broadcast of all their bytes, laid out as rollout/flat_bucket.py says (an unaligned layout is refused
        before anything is received, as SGLang does)."""
        if flattened:
            try:
                size = byte_offsets(names, dtypes, shapes)[1]
            except ValueError as exc:
                raise HTTPError(400, f"load_format {LOAD_FORMAT!r}: {exc} (nothing was received)") from exc
            buffers = [(f"the flattened bucket of {len(names)} tensors", torch.empty(size, dtype=torch.uint8))]
        else:
            buffers = [(repr(name), torch.empty(shape, dtype=dtype))
                       for name, dtype, shape in zip(names, dtypes, shapes, strict=True)]
        with self._groups_lock:  # one receiver at a time: the broadcasts arrive in order
            group = self.groups.get(group_name)
            if group is None:
                raise HTTPError(400, f"group_name: no group {group_name!r} (call /init_weights_update_group first)")
            for what, buffer in buffers:
                try:
                    dist.broadcast(buffer, src=0, group=group)
                except Exception as exc:  # noqa: BLE001 - a peer that left or timed out
                    raise HTTPError(400, f"receiving {what} from rank 0 of group {group_name!r} failed: {exc}"
                                    ) from exc
        if flattened:
            return unflatten(buffers[0][1], names, dtypes, shapes)
        return [(name, buffer) for name, (_, buffer) in zip(names, buffers, strict=True)]

    def update_weights_from_tensor(self, body: dict) -> dict:
        if "serialized_named_tensors" in body:
            raise HTTPError(400, "serialized_named_tensors: not accepted (SGLang's payload is a pickle, which can run "
                                 "code when loaded); send safetensors: the base64 of a safetensors file")
        f = fields(body, {"safetensors": "str"}, {
            "weight_version": ("version", None), "flush_cache": ("bool", True), "abort_all_requests": ("bool", False),
            "load_format": ("null", None)})
        self._require_session("update_weights_from_tensor")
        try:
            tensors = list(load_safetensors(base64.b64decode(f["safetensors"], validate=True)).items())
        except (binascii.Error, ValueError) as exc:
            raise HTTPError(400, f"safetensors: not base64: {exc}") from exc
        except SafetensorError as exc:
            raise HTTPError(400, f"safetensors: not a safetensors file: {exc}") from exc
        self._load(tensors, f["weight_version"], f["abort_all_requests"], "update_weights_from_tensor")
        return {"success": True, "message": "Succeeded to update model weights."}

    def update_weights_from_disk(self, body: dict) -> dict:
        f = fields(body, {"model_path": "str"}, {
            "weight_version": ("version", None), "flush_cache": ("bool", True), "abort_all_requests": ("bool", False),
            "load_format": ("null", None)})
        files = sorted(Path(f["model_path"]).glob("*.safetensors"))
        if not files:
            raise HTTPError(400, f"model_path: {f['model_path']!r} holds no *.safetensors files "
                                 "(a Hugging Face checkpoint directory on this machine is expected)")
        try:
            tensors = []
            for file in files:  # safetensors 0.8: get_tensor is a view into a private map of the file, no copy
                with safe_open(file, framework="pt") as reader:
                    tensors += [(name, reader.get_tensor(name)) for name in reader.keys()]
        except (OSError, SafetensorError) as exc:
            raise HTTPError(400, f"model_path: reading {file} failed: {exc}") from exc
        self._load(tensors, f["weight_version"], f["abort_all_requests"], "update_weights_from_disk")
        self.model_path = f["model_path"]
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def _require_session(self, endpoint: str) -> None:
        if not self.scheduler.session:
            raise HTTPError(400, f"{endpoint} must run between begin_weight_update and end_weight_update "
                                 "(POST /begin_weight_update first)")

    @staticmethod
    def _dtype(name: str, field_name: str) -> torch.dtype:
        if name not in DTYPES:
            raise HTTPError(400, f"{field_name}: expected one of {', '.join(DTYPES)}, got {name!r}")
        return DTYPES[name]

    def _load(self, tensors: list[tuple[str, torch.Tensor]], version, abort_all: bool, endpoint: str) -> None:
        """Cast to the parameters' dtype, copy all or nothing, then set the weight version."""
        params = self.generator.params_by_name
        cast = [(n, t.to(params[n].dtype) if n in params else t) for n, t in tensors]
        if abort_all:
            self.scheduler.abort(None, abort_all=True)
        start = time.perf_counter()
        with self.scheduler.writing_weights():
            try:
                count = self.generator.load_weights(cast)
            except (KeyError, ValueError) as exc:
                raise HTTPError(400, f"{endpoint}: {exc.args[0]} (no weight was changed)") from exc
            if version is not None:
                self.scheduler.set_version(str(version))
        log.info("%s: %d tensors loaded in %.3f s, weight_version %s", endpoint, count, time.perf_counter() - start,
                 self.scheduler.weight_version)

    def close(self) -> None:
        self.scheduler.stop()
        with self._groups_lock:
            for group in self.groups.values():
                destroy_custom_process_group(group)
            self.groups.clear()


# --- HTTP --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Route:
    methods: tuple[str, ...]
    access: str  # "open": anyone; "reader": the token on a non-loopback bind; "admin": the token


_ROUTES = {
    "/health": _Route(("GET",), "open"),
    "/health_generate": _Route(("GET",), "open"),
    "/generate": _Route(("POST", "PUT"), "reader"),
    "/get_weight_version": _Route(("GET",), "reader"),
    "/get_model_info": _Route(("GET",), "reader"),
    "/model_info": _Route(("GET",), "reader"),
    "/flush_cache": _Route(("GET", "POST"), "admin"),
    "/pause_generation": _Route(("POST",), "admin"),
    "/continue_generation": _Route(("POST",), "admin"),
    "/abort_request": _Route(("POST",), "admin"),
    "/get_weights_by_name": _Route(("GET", "POST"), "admin"),
    "/begin_weight_update": _Route(("POST",), "admin"),
    "/end_weight_update": _Route(("POST",), "admin"),
    "/init_weights_update_group": _Route(("POST",), "admin"),
    "/destroy_weights_update_group": _Route(("POST",), "admin"),
    "/update_weights_from_distributed": _Route(("POST",), "admin"),
    "/update_weights_from_tensor": _Route(("POST",), "admin"),
    "/update_weights_from_disk": _Route(("POST",), "admin"),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "megatron-rl-serve"
    app: Server  # set on the subclass made by make_http_server

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            route = _ROUTES.get(path)
            if route is None:
                raise HTTPError(404, f"no endpoint {path}")
            if method not in route.methods:
                raise HTTPError(405, f"{path} takes {' or '.join(route.methods)}, not {method}")
            self._authorize(route.access)
            result = getattr(self.app, path.lstrip("/"))(self._json_body(route.access))
            self._send(200, result)
        except HTTPError as exc:
            self._send(exc.status, {"success": False, "message": exc.message})
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 and the server goes on
            log.exception("%s %s failed", method, path)
            self._send(500, {"success": False, "message": f"internal error: {type(exc).__name__}: {exc}"})

    def _authorize(self, access: str) -> None:
        token = self.app.token
        if token is None or access == "open" or (access == "reader" and self.app.loopback):
            return
        header = self.headers.get("Authorization", "")
        if not header:
            raise HTTPError(401, "Unauthorized: this endpoint needs the header 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
            raise HTTPError(403, "Forbidden: wrong token")

    def _json_body(self, access: str) -> dict:
        length = self.headers.get("Content-Length", "0").strip()
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise HTTPError(411, "chunked request bodies are not supported: send Content-Length")
        if not length.isdigit():
            raise HTTPError(400, f"Content-Length: expected a number of bytes, got {length!r}")
        if int(length) > MAX_BODY[access]:
            raise HTTPError(413, f"request body of {length} bytes; at most {MAX_BODY[access]} accepted here")
        if int(length) == 0:
            return {}
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise HTTPError(400, f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def _send(self, status: int, result) -> None:
        if result is None:
            data, content_type = b"", "text/plain"
        elif isinstance(result, str):
            data, content_type = result.encode(), "text/plain; charset=utf-8"
        else:
            data, content_type = json.dumps(result).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status != 200:  # the request's body may be unread: do not read the next request from it
            self.close_connection = True
            self.send_header("Connection", "close")
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.debug("%s %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = socket.SOMAXCONN  # the default backlog of 5 resets connections beyond a few at once


def make_http_server(app: Server, host: str, port: int) -> ThreadingHTTPServer:
    return _HTTPServer((host, port), type("Handler", (_Handler,), {"app": app}))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _exit_with_parent(parent_pid: int, http_server, interval: float = 1.0) -> None:
    """Shut the server down once `parent_pid` (the trainer that launched it) has exited, even by SIGKILL."""
    while True:
        time.sleep(interval)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            log.warning("launching process %d is gone: shutting down", parent_pid)
            http_server.shutdown()
            return


def serve(model_path: str, host: str = "127.0.0.1", port: int = 30000, token: str | None = None,
          no_token: bool = False, dtype: str = "float32", max_batch_size: int = 64, threads: int = 0,
          logit_noise_std: float = 0.0, logit_noise_seed: int = 0) -> int:
    """Run the server until SIGTERM / SIGINT; the exit code (EXIT_USAGE when it refuses to start).
    token None: $MEGATRON_RL_SERVE_TOKEN."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None and no_token:
        return _refuse("--no-token and a token (--token or $MEGATRON_RL_SERVE_TOKEN) exclude each other")
    if token is None and not no_token:
        return _refuse(f"no token: set ${TOKEN_ENV} (or --token) to the bearer token clients must send, or pass "
                       "--no-token to serve every endpoint, weight updates included, to anyone who can connect")
    if no_token and not is_loopback(host):
        return _refuse(f"--no-token is accepted on a loopback address only, not on --host {host}")
    if dtype not in ("float32", "bfloat16"):
        return _refuse(f"--dtype: expected float32 or bfloat16, got {dtype!r}")
    if threads:
        torch.set_num_threads(threads)
    try:
        noise = LogitNoise(logit_noise_std, logit_noise_seed)
        model = load_hf_model(model_path, DTYPES[dtype])
        app = Server(HFGenerator(model, eos_token_ids(model), max_batch_size, noise), model_path, token,
                     is_loopback(host))
    except (OSError, ValueError) as exc:  # no checkpoint there, a bad --max-batch-size or --logit-noise-std
        return _refuse(str(exc))
    try:
        http_server = make_http_server(app, host, port)
    except OSError as exc:
        return _refuse(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    app.scheduler.start()

    def shut_down(signum, frame):
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=http_server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    if os.environ.get(PARENT_ENV):
        threading.Thread(target=_exit_with_parent, args=(int(os.environ[PARENT_ENV]), http_server), daemon=True,
                         name="parent-watch").start()
    log.info("serving %s (%s, max batch %d, %d threads, logit noise std %g seed %d) on http://%s:%d; token %s",
             model_path, dtype, max_batch_size, torch.get_num_threads(), noise.std, noise.seed, host,
             http_server.server_address[1],
             "required for admin endpoints" + ("" if app.loopback else " and /generate") if token else "off")
    try:
        http_server.serve_forever()
    finally:
        app.close()
        http_server.server_close()
        log.info("stopped")
    return 0


def _refuse(message: str) -> int:
    print(f"megatron-rl serve: {message}", file=sys.stderr)
    return EXIT_USAGE

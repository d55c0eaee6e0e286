"""Batched generation with a KV cache on a Hugging Face transformers model: the CPU rollout engine.

`HFGenerator.generate` runs prompts in chunks of `max_batch_size` rows (sorted by length, so rows
of similar length share a chunk). A chunk is left-padded to [b, L] with an attention mask and
explicit position ids (row i counts 0, 1, ... from its first real token), prefilled once, then
decoded one token per step through a `DynamicCache`; rows that finish leave the batch (the cache
keeps only the rows still running).

Logprobs follow SGLang's default, the contract the RL losses rely on. For the token y_t sampled
at step t of a row with temperature T,

    logprob_t = log_softmax(logits_t / T)[y_t]      float32, over the full vocabulary,

before top-k / top-p, which shape only the distribution sampled from. Temperatures below 1e-6
are greedy, as in SGLang: y_t = argmax(logits_t) and logprob_t = log_softmax(logits_t)[y_t].

Sampling is the exponential race y_t = argmax_i p_i / E_i with p the (top-k / top-p filtered)
probabilities and E_i = -log U_i ~ Exp(1) i.i.d., which draws i with probability p_i / sum(p). Each
row draws its U from its own `torch.Generator` (seeded with `sampling_seed`, or from torch's global
generator when it has none), so a request's tokens do not depend on the other rows of its batch.

With `logit_noise` (rollout/logit_noise.py, off by default) the tempered logits logits_t / T of every decode step
get Gaussian noise before both the logprob and the sampling: logprob_t = log_softmax(logits_t / T + S * eps_t)[y_t]
and y_t is drawn from (greedy: the argmax of) that same distribution, the engine's behaviour policy mu.
"""

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from megatron_rl.rollout.logit_noise import LogitNoise

GREEDY_BELOW = 1e-6  # temperatures below this are greedy (SGLang's _SAMPLING_EPS)
ABORT_MESSAGE = "generation aborted"
NO_NOISE = LogitNoise()  # the default: logits as the model computes them


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters, with SGLang's names and defaults."""

    temperature: float = 1.0  # < 1e-6: greedy (argmax); logprobs then log_softmax(logits)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose mass reaches top_p
    top_k: int = -1  # keep the top_k most likely tokens; -1: off
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()  # end a row, like the model's eos ids
    ignore_eos: bool = False  # no token ends a row, neither the eos ids nor stop_token_ids (as in SGLang)
    sampling_seed: int | None = None  # same seed + same prompt => same tokens, whatever the batch

    def __post_init__(self):
        _check(self)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """From SGLang's `sampling_params` JSON object; unknown keys and bad values raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be an object, got {type(d).__name__}")
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"sampling_params: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"known keys: {', '.join(known)}")
        return cls(**d)


def is_int(value) -> bool:
    """An int that is not a bool (JSON true/false must not pass as 1/0)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check(params: SamplingParams) -> None:
    """ValueError naming the first bad field, its value and what is allowed."""
    problems = {
        "temperature": (_is_number(params.temperature) and params.temperature >= 0,
                        "a finite number >= 0 (0: greedy)"),
        "top_p": (_is_number(params.top_p) and 0 < params.top_p <= 1, "a number in (0, 1]"),
        "top_k": (is_int(params.top_k) and (params.top_k == -1 or params.top_k >= 1), "-1 (off) or an integer >= 1"),
        "max_new_tokens": (is_int(params.max_new_tokens) and params.max_new_tokens >= 0, "an integer >= 0"),
        "stop_token_ids": (params.stop_token_ids is None or (isinstance(params.stop_token_ids, list | tuple)
                           and all(is_int(t) and t >= 0 for t in params.stop_token_ids)),
                           "a list of token ids (integers >= 0) or null"),
        "ignore_eos": (isinstance(params.ignore_eos, bool), "true or false"),
        "sampling_seed": (params.sampling_seed is None or is_int(params.sampling_seed), "an integer or null"),
    }
    for name, (ok, allowed) in problems.items():
        if not ok:
            raise ValueError(f"sampling_params.{name}: expected {allowed}, got {getattr(params, name)!r}")


@dataclass
class Completion:
    """One request's output, in SGLang's terms."""

    output_ids: list[int]
    output_logprobs: list[float]  # logprob_t of each output token (module docstring)
    finish_reason: dict  # {"type": "stop", "matched": id} | {"type": "length", "length": n} | {"type": "abort", ...}


def eos_token_ids(model: transformers.PreTrainedModel) -> list[int]:
    """The model's end-of-sequence ids: generation_config's, then config's (each an int, a list or None)."""
    ids: list[int] = []
    for config in (model.generation_config, model.config):
        value = getattr(config, "eos_token_id", None) if config is not None else None
        for token in [value] if is_int(value) else value or []:
            if token not in ids:
                ids.append(token)
    return ids


def load_hf_model(path: str, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A causal LM from a local Hugging Face checkpoint directory (config.json + *.safetensors), in eval mode."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"model path {path!r}: not a directory (a local Hugging Face checkpoint directory "
                                "with config.json and *.safetensors is expected; nothing is downloaded)")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model path {path!r}: no config.json (not a Hugging Face checkpoint directory)")
    if not any(directory.glob("*.safetensors")):
        found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise FileNotFoundError(f"model path {path!r}: no *.safetensors weights"
                                + (f" (found {', '.join(found)}; only safetensors are loaded)" if found else ""))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, use_safetensors=True)
    return model.eval()


class _RowSampler:
    """The sampling state of the rows of one chunk: per-row [b] tensors and a generator per sampling row."""

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, noise: LogitNoise):
        self.greedy = torch.tensor([p.temperature < GREEDY_BELOW for p in params])
        self.temperature = torch.tensor([1.0 if p.temperature < GREEDY_BELOW else p.temperature for p in params])
        self.top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params])
        self.top_p = torch.tensor([float(p.top_p) for p in params])
        self.generators = [None if p.temperature < GREEDY_BELOW else _generator(p.sampling_seed) for p in params]
        self.noise = noise
        self.noise_seeds = [noise.request_seed(p.sampling_seed) for p in params] if noise.enabled else []
        self.vocab_size = vocab_size
        self._summarise()

    def _summarise(self) -> None:
        self.samples = not bool(self.greedy.all())
        self.filters = bool((self.top_k < self.vocab_size).any() or (self.top_p < 1).any())

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the current rows)."""
        self.greedy, self.temperature = self.greedy[rows], self.temperature[rows]
        self.top_k, self.top_p = self.top_k[rows], self.top_p[rows]
        self.generators = [self.generators[row] for row in rows.tolist()]
        self.noise_seeds = [self.noise_seeds[row] for row in rows.tolist()] if self.noise.enabled else []
        self._summarise()

    def __call__(self, logits: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens [b] and their logprobs [b] from float32 logits [b, V] of decode step `step` (0: the first
        output token): from logits / T, plus the logit noise of each row at that step when it is on."""
        scaled = logits / self.temperature[:, None]  # greedy rows: T = 1, scaled == logits exactly
        if self.noise.enabled:
            scaled = scaled + self.noise(self.noise_seeds, step, logits.shape[-1])
        logprobs = torch.log_softmax(scaled, dim=-1)
        tokens = scaled.argmax(dim=-1)
        if self.samples:
            probs = logprobs.exp()
            sampled = self._race(self._filtered(probs) if self.filters else probs)
            tokens = torch.where(self.greedy, tokens, sampled)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)

    def _filtered(self, probs: torch.Tensor) -> torch.Tensor:
        """probs with tokens outside each row's top-k and top-p set to 0 (not renormalised)."""
        vocab_size = probs.shape[-1]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(vocab_size)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        dropped = (rank >= self.top_k[:, None]) | (mass_before > self.top_p[:, None])
        return torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(dropped, 0.0))

    def _race(self, probs: torch.Tensor) -> torch.Tensor:
        """argmax_i p_i / E_i with E_i = -log U_i ~ Exp(1), U_i uniform in (0, 1) from each row's own generator
        (greedy rows: U = 1/2, their result is not used). E > 0, so p_i = 0 never wins."""
        uniform = torch.full_like(probs, 0.5)
        for row, generator in enumerate(self.generators):
            if generator is not None:
                uniform[row].uniform_(generator=generator)  # [0, 1); ~8x faster than exponential_ on CPU
        exponential = uniform.clamp_min_(torch.finfo(uniform.dtype).tiny).log_().neg_()
        return (probs / exponential).argmax(dim=-1)


def _generator(seed: int | None) -> torch.Generator:
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    return torch.Generator().manual_seed(seed % 2**64)


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids [b, L] of the prompts padded on the left to the longest (pad id 0,
    mask 0); positions count 0, 1, ... from each row's first token (the padding gets position 0)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp_min(0)


def _stop_table(stop_sets: list[set[int]]) -> torch.Tensor:
    """[b, S] the token ids that end each row, padded with -1 (S = the largest set, possibly 0)."""
    table = torch.full((len(stop_sets), max(map(len, stop_sets))), -1, dtype=torch.long)
    for row, stops in enumerate(stop_sets):
        table[row, :len(stops)] = torch.tensor(sorted(stops), dtype=torch.long)
    return table


class HFGenerator:
    """Batched generation with per-token logprobs and in-place weight updates for one HF causal LM.

    Not thread-safe: the caller runs one generate or load_weights at a time (a weight update between two decode
    steps would mix two policies in one sample).
    """

    def __init__(self, model: transformers.PreTrainedModel, eos_token_ids: Sequence[int], max_batch_size: int = 64,
                 logit_noise: LogitNoise = NO_NOISE):
        if not is_int(max_batch_size) or max_batch_size < 1:
            raise ValueError(f"max_batch_size: expected an integer >= 1, got {max_batch_size!r}")
        self.logit_noise = logit_noise
        self.model = model.eval()
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        # every name, tied aliases included (lm_head.weight and model.embed_tokens.weight are one tensor when tied)
        self.params_by_name = dict(model.named_parameters(remove_duplicate=False))
        self.device = next(model.parameters()).device

    def generate(self, prompts: list[list[int]], params: list[SamplingParams],
                 should_abort: Callable[[], bool] | None = None) -> list[Completion]:
        """One Completion per prompt, in order. `should_abort()` is polled before the prefill and between decode
        steps of each chunk; once it returns True, every unfinished row ends with finish_reason type "abort"."""
        self._check_requests(prompts, params)
        results: list[Completion | None] = [None] * len(prompts)
        rows = sorted((i for i in range(len(prompts)) if params[i].max_new_tokens > 0), key=lambda i: len(prompts[i]))
        for i in set(range(len(prompts))) - set(rows):
            results[i] = Completion([], [], {"type": "length", "length": 0})
        aborted = should_abort or (lambda: False)
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            for i, completion in zip(chunk, self._generate_chunk([prompts[i] for i in chunk],
                                                                 [params[i] for i in chunk], aborted), strict=True):
                results[i] = completion
        return results

    def _check_requests(self, prompts, params) -> None:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params; one each is expected")
        for i, (prompt, sampling) in enumerate(zip(prompts, params, strict=True)):
            if not isinstance(sampling, SamplingParams):
                raise ValueError(f"params[{i}]: expected SamplingParams, got {type(sampling).__name__}")
            if not isinstance(prompt, list | tuple) or not prompt:
                raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, got {prompt!r:.80}")
            bad = next((t for t in prompt if not (is_int(t) and 0 <= t < self.vocab_size)), None)
            if bad is not None:
                raise ValueError(f"prompts[{i}]: token id {bad!r} is not an integer in [0, {self.vocab_size})")
            if self.context_length is not None and len(prompt) + sampling.max_new_tokens > self.context_length:
                raise ValueError(f"prompts[{i}]: {len(prompt)} prompt tokens + max_new_tokens "
                                 f"{sampling.max_new_tokens} exceed the model's context length {self.context_length}")

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], params: list[SamplingParams],
                        aborted: Callable[[], bool]) -> list[Completion]:
        """Generate for at most max_batch_size rows at once; the cache holds only the rows still running."""
        if aborted():
            return [Completion([], [], {"type": "abort", "message": ABORT_MESSAGE}) for _ in prompts]
        batch = len(prompts)
        input_ids, attention_mask, position_ids = _left_padded(prompts)
        next_position = torch.tensor([len(p) for p in prompts])
        max_new = torch.tensor([p.max_new_tokens for p in params])
        stop_table = _stop_table([set() if p.ignore_eos else set(p.stop_token_ids) | set(self.eos_token_ids)
                                  for p in params])
        sampler = _RowSampler(params, self.vocab_size, self.logit_noise)

        out_ids = torch.zeros(batch, int(max_new.max()), dtype=torch.long)
        out_logprobs = torch.zeros(batch, int(max_new.max()), dtype=torch.float32)
        finish: list[dict | None] = [None] * batch
        lengths = [0] * batch
        running = torch.arange(batch)  # the chunk rows still in the batch; the per-row tensors follow it
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                            position_ids=position_ids.to(self.device), past_key_values=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1].float().cpu()
        for step in range(int(max_new.max())):
            tokens, logprobs = sampler(logits, step)
            out_ids[running, step], out_logprobs[running, step] = tokens, logprobs
            stopped = (tokens[:, None] == stop_table).any(dim=-1)
            done = stopped | (max_new == step + 1)
            if bool(done.any()):
                for row, token, was_stop in zip(running[done].tolist(), tokens[done].tolist(),
                                                stopped[done].tolist(), strict=True):
                    finish[row] = ({"type": "stop", "matched": token} if was_stop
                                   else {"type": "length", "length": step + 1})
                    lengths[row] = step + 1
                keep = (~done).nonzero().squeeze(-1)
                if len(keep) == 0:
                    break
                cache.batch_select_indices(keep.to(self.device))
                sampler.keep(keep)
                running, tokens, attention_mask = running[keep], tokens[keep], attention_mask[keep]
                stop_table, max_new, next_position = stop_table[keep], max_new[keep], next_position[keep]
            if aborted():
                for row in running.tolist():
                    finish[row], lengths[row] = {"type": "abort", "message": ABORT_MESSAGE}, step + 1
                break
            attention_mask = torch.cat([attention_mask, torch.ones(len(running), 1, dtype=torch.long)], dim=1)
            logits = self.model(input_ids=tokens[:, None].to(self.device),
                                attention_mask=attention_mask.to(self.device),
                                position_ids=(next_position + step)[:, None].to(self.device),
                                past_key_values=cache, use_cache=True).logits[:, -1].float().cpu()

        return [Completion(out_ids[row, :n].tolist(), out_logprobs[row, :n].tolist(), finish[row])
                for row, n in enumerate(lengths)]

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy tensors into the parameters of the same HF name, in place; return how many were copied.

        Every tensor is checked (known name, same shape and dtype) before any is copied, so a bad one leaves the
        model untouched. Tied parameters answer to both names (lm_head.weight and model.embed_tokens.weight).
        """
        staged: dict[int, tuple[str, torch.nn.Parameter, torch.Tensor]] = {}  # id(parameter) -> (name, it, new)
        names: set[str] = set()
        for name, tensor in named_tensors:
            if name in names:
                raise ValueError(f"weight {name!r} is given twice")
            names.add(name)
            param = self.params_by_name.get(name)
            if param is None:
                raise KeyError(f"unknown weight {name!r}: the model has no parameter of that name "
                               f"({len(self.params_by_name)} names, e.g. {', '.join(list(self.params_by_name)[:3])})")
            if not isinstance(tensor, torch.Tensor) or tensor.shape != param.shape or tensor.dtype != param.dtype:
                got = (f"shape {tuple(tensor.shape)} dtype {tensor.dtype}" if isinstance(tensor, torch.Tensor)
                       else type(tensor).__name__)
                raise ValueError(f"weight {name!r}: expected shape {tuple(param.shape)} dtype {param.dtype}, got {got}")
            tied = staged.get(id(param))
            if tied is not None and not torch.equal(tied[2], tensor):
                raise ValueError(f"weight {name!r} is tied to {tied[0]!r} but the two tensors given differ")
            staged[id(param)] = (name, param, tensor)
        for _, param, tensor in staged.values():
            param.copy_(tensor)
        return len(names)

    def weights_by_name(self, name: str, truncate_size: int = 100) -> list[float]:
        """The first truncate_size values of the flattened parameter `name`, as floats (SGLang's
        /get_weights_by_name)."""
        param = self.params_by_name.get(name)
        if param is None:
            raise KeyError(f"unknown weight {name!r}: the model has no parameter of that name")
        if not is_int(truncate_size) or truncate_size < 0:
            raise ValueError(f"truncate_size: expected an integer >= 0, got {truncate_size!r}")
        return param.detach().flatten()[:truncate_size].float().tolist()

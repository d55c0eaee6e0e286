"""Throughput of the CPU rollout engine (megatron_rl.rollout.hf_engine.HFGenerator): output tokens per second.

    python tools/bench_generation.py                        # batch 1, 8, 32; 128 new tokens; median of 3
    python tools/bench_generation.py --batch-sizes 1,64 --new-tokens 256 --dtype bfloat16 --threads 2
    python tools/bench_generation.py --quick                # a smoke run (numbers not meaningful)

The model is a random tiny Qwen3 (2 layers, hidden 256, MLP 512, 4 heads, 2 KV heads, head dim 64, vocab 1024, tied
embeddings), saved to a temporary directory and loaded back with load_hf_model. Every request has a prompt of
--prompt-len random token ids and samples exactly --new-tokens tokens (ignore_eos, temperature 1, one seed per
row), logprobs included as always. Side by side, the same model and prompts through HF's own `model.generate`
(left-padded batch, do_sample at temperature 1, top_k 0, min_new_tokens = max_new_tokens, output_logits, then the
logprobs of the sampled tokens from those logits), the way research/rollout_cpu.md measured it. For each batch
size: one warm-up call of each, then --repeats rounds of one timed call of each; printed are the median and best
tokens/s (batch x new tokens / wall time) and the ratio of the medians. Other processes on the machine make the
times jump; the ratio of two engines timed in the same rounds is the steadier number.
"""

import argparse
import statistics
import tempfile
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from megatron_rl.rollout.hf_engine import HFGenerator, SamplingParams, load_hf_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_qwen3(directory: str, dtype: torch.dtype):
    torch.manual_seed(0)
    config = Qwen3Config(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    Qwen3ForCausalLM(config).save_pretrained(directory)
    return load_hf_model(directory, dtype=dtype)


def engines(generator: HFGenerator, batch_size: int, args) -> dict:
    """name -> a call that generates args.new_tokens tokens with logprobs for batch_size prompts."""
    prompts = torch.randint(0, 1024, (batch_size, args.prompt_len))
    params = [SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, sampling_seed=row)
              for row in range(batch_size)]

    def ours():
        completions = generator.generate(prompts.tolist(), params)
        assert all(len(c.output_ids) == args.new_tokens for c in completions)

    @torch.inference_mode()
    def hf_generate():
        out = generator.model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                       temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                                       min_new_tokens=args.new_tokens, pad_token_id=0, output_logits=True,
                                       return_dict_in_generate=True)
        sampled = out.sequences[:, args.prompt_len:]
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), -1).gather(-1, sampled[..., None])
        assert logprobs.shape == (batch_size, args.new_tokens, 1)

    return {"HFGenerator": ours, "HF generate": hf_generate}


def tokens_per_second(generator: HFGenerator, batch_size: int, args) -> dict[str, list[float]]:
    calls = engines(generator, batch_size, args)
    for call in calls.values():  # warm-up
        call()
    rates = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            rates[name].append(batch_size * args.new_tokens / (time.perf_counter() - start))
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 4, 8 new tokens, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.new_tokens, args.repeats = "1,4", 8, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as directory:
        generator = HFGenerator(tiny_qwen3(directory, DTYPES[args.dtype]), eos_token_ids=[])
    print(f"tiny Qwen3 (2 layers, hidden 256, vocab 1024), {args.dtype}, {torch.get_num_threads()} threads, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'':>6} {'HFGenerator tok/s':>19} {'HF generate tok/s':>19}")
    print(f"{'batch':>6} {'median':>9} {'best':>9} {'median':>9} {'best':>9} {'ours/HF':>7}")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        rates = tokens_per_second(generator, batch_size, args)
        ours, hf = (statistics.median(rates[name]) for name in ("HFGenerator", "HF generate"))
        print(f"{batch_size:>6} {ours:>9.0f} {max(rates['HFGenerator']):>9.0f} {hf:>9.0f} "
              f"{max(rates['HF generate']):>9.0f} {ours / hf:>7.2f}", flush=True)


if __name__ == "__main__":
    main()

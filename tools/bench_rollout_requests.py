"""Rollout wall time through the Fleet: one /generate request per sample against one request per prompt's group.

    python tools/bench_rollout_requests.py [--prompts 32] [--samples 8] [--new-tokens 3] [--rounds 5]

Writes the quickstart's toy task to a temporary directory, starts one `megatron-rl serve` engine on its model
(float32, max batch 128, 1 thread) and generates the quickstart's rollout: --prompts chat prompts x --samples
samples of --new-tokens tokens at temperature 1, one sampling_seed per sample, through
Fleet(max_concurrency=64), the trainer's path:
  per-sample   Fleet.generate(..., prompts_per_request=1): prompts x samples requests
  per-group    Fleet.generate(..., prompts_per_request=samples): one request per prompt
Each round times one rollout of each, alternating which goes first; printed are the median and best seconds and
the ratio of the medians. Both return the same tokens (checked): only the number of requests differs.
"""

import argparse
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from megatron_rl.config.sections import EngineSpec, RolloutConfig
from megatron_rl.data.toy_task import build_tokenizer, toy_prompts, write_toy_task
from megatron_rl.ports import free_port
from megatron_rl.rollout.engines import launch_engines
from megatron_rl.rollout.fleet import Fleet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for row in toy_prompts(args.prompts, seed=0)]
    inputs = [list(p) for p in prompts for _ in range(args.samples)]
    params = [{"temperature": 1.0, "max_new_tokens": args.new_tokens, "ignore_eos": True, "sampling_seed": i}
              for i in range(len(inputs))]
    sizes = {"per-sample": 1, "per-group": args.samples}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_toy_task(tmp, num_prompts=1) / "model"
        rollout = RolloutConfig(engines=[EngineSpec(port=free_port())], startup_timeout=120)
        engines = launch_engines(rollout, str(model), Path(tmp) / "logs", secrets.token_hex(8))
        fleet = Fleet(engines, max_concurrency=64, max_retries=0)
        try:
            outputs = {label: fleet.generate(inputs, params, size) for label, size in sizes.items()}  # warm-up
            same = [g.output_ids for g in outputs["per-sample"]] == [g.output_ids for g in outputs["per-group"]]
            times: dict[str, list[float]] = {label: [] for label in sizes}
            for round_index in range(args.rounds):
                order = list(sizes) if round_index % 2 == 0 else list(reversed(sizes))
                for label in order:
                    start = time.perf_counter()
                    fleet.generate(inputs, params, sizes[label])
                    times[label].append(time.perf_counter() - start)
        finally:
            fleet.shutdown()
    print(f"{args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens, {args.rounds} rounds; "
          f"the same tokens both ways: {same}")
    print(f"{'requests':<12}{'count':>8}{'median s':>10}{'best s':>10}")
    for label, size in sizes.items():
        count = -(-len(inputs) // size)
        print(f"{label:<12}{count:>8}{statistics.median(times[label]):>10.3f}{min(times[label]):>10.3f}")
    ratio = statistics.median(times["per-sample"]) / statistics.median(times["per-group"])
    print(f"per-group is {ratio:.2f}x faster (ratio of the medians)")


if __name__ == "__main__":
    main()

"""Write the protocol suite's tiny Qwen3 (tests/rollout/test_protocol.py: TINY, seed 0) as a checkpoint SGLang loads.

    .venv/bin/python tests/sglang/tiny_checkpoint.py OUT_DIR

OUT_DIR gets the float32 weights and config (the same ones the suite builds for `megatron-rl serve`) and the
quickstart's word-level tokenizer (megatron_rl/data/toy_task.py): SGLang needs a tokenizer to start. The tokenizer
names 35 of the model's 128 ids; the suite sends token ids and reads token ids, so the rest need no names. Its eos is
set to the model's (SGLang stops at both, `megatron-rl serve` at the model's only), so both servers stop alike.
"""

import sys
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM

from megatron_rl.data.toy_task import build_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
from test_protocol import TINY  # noqa: E402 - the suite's own config, not a copy of it


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    Qwen3ForCausalLM(TINY).save_pretrained(out_dir)
    tokenizer = build_tokenizer()
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(TINY.eos_token_id)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tiny_checkpoint.py OUT_DIR")
    main(sys.argv[1])

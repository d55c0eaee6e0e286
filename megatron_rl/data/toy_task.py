"""The quickstart's task, built offline: a word-level tokenizer, a tiny random Qwen3, and prompts.

The task is "Repeat the number: 7" -> "7". An untrained model answers it with probability about
1 / vocabulary (~0.03 after math_reward's last-number rule); the answer is one token that the prompt
contains, so a two-layer model with tied embeddings learns it by RL in about a hundred steps.

    write_toy_task(out_dir)   # out_dir/model (HF checkpoint + tokenizer), out_dir/train.jsonl

Everything is built in code from a fixed seed; nothing is downloaded.
"""

import json
import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
WORDS = ["system", "user", "assistant", "\n", "Repeat", "the", "number", ":", "Say", "digit", "please", "answer",
         "is", "a", "it", "and", "then", "so", "ok", "yes", "no"]
DIGITS = [str(d) for d in range(10)]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROMPT_TEMPLATES = ["Repeat the number: {d}", "Say the digit {d}", "Repeat {d} please"]


def build_tokenizer():
    """A word-level tokenizer: words, digits and newlines are tokens, spaces separate them.
    Vocabulary: the 4 special tokens, then WORDS, then the digits (35 entries)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS + DIGITS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" +"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n|\d|[A-Za-z]+|[^\sA-Za-z\d]"), behavior="isolated"),
    ])
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int):
    """A random 2-layer Qwen3 (hidden 64, 4 heads, 2 key/value heads, tied embeddings), float32."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
                         eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
                         pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"), bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float()


def toy_prompts(count: int, seed: int) -> list[dict]:
    """`count` rows {"prompt": ..., "answer": digit}, digits and phrasings drawn uniformly."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        digit = rng.choice(DIGITS)
        rows.append({"prompt": rng.choice(PROMPT_TEMPLATES).format(d=digit), "answer": digit})
    return rows


def write_toy_task(out_dir: str | Path, num_prompts: int = 2000, seed: int = 0, vocab_size: int = 64) -> Path:
    """Write out_dir/model (config, safetensors weights, tokenizer) and out_dir/train.jsonl; returns out_dir."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    if len(tokenizer) > vocab_size:
        raise ValueError(f"vocab_size must be >= the tokenizer's {len(tokenizer)} tokens, got {vocab_size}")
    model = build_model(vocab_size, seed)
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    lines = "".join(json.dumps(row) + "\n" for row in toy_prompts(num_prompts, seed))
    (out / "train.jsonl").write_text(lines)
    return out

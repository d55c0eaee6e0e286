"""HFGenerator on tiny random HF models saved to disk: logprobs equal a teacher-forced forward, sampling, stop
rules, per-request seeds, abort, weight loading, errors on bad input; and a smoke run of tools/bench_generation.py.

The reference for every generated token y_t of a prompt p is one unpadded forward of p + y:
log_softmax(logits / T) at the position before y_t, gathered at y_t (T = 1 when greedy).
"""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from megatron_rl.rollout.hf_engine import (
    Completion,
    HFGenerator,
    SamplingParams,
    eos_token_ids,
    load_hf_model,
)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 128
TOL = 1e-5
# lengths 1..17 in one batch: every row but the longest is left-padded
PROMPTS = [[5, 9, 2], list(range(20, 29)), [77], list(range(40, 57))]
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.2)  # peaked logits


def save_tiny(directory, model_class, config, seed):
    torch.manual_seed(seed)
    model_class(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("qwen3"), Qwen3ForCausalLM,
                     Qwen3Config(**TINY, tie_word_embeddings=True, eos_token_id=1), seed=0)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama"), LlamaForCausalLM,
                     LlamaConfig(**TINY, tie_word_embeddings=False, eos_token_id=[1, 2]), seed=1)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request, qwen3_path, llama_path):
    return load_hf_model(qwen3_path if request.param == "qwen3" else llama_path)


def teacher_forced_logits(model, prompt, output) -> torch.Tensor:
    """[len(output), V] float32 logits predicting each output token, from one unpadded forward of prompt + output."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    return logits[len(prompt) - 1:len(prompt) - 1 + len(output)]


def reference_logprobs(model, prompt, completion: Completion, temperature) -> torch.Tensor:
    logits = teacher_forced_logits(model, prompt, completion.output_ids)
    scaled = logits / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled, -1).gather(-1, torch.tensor(completion.output_ids)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_teacher_forced_forward(model, temperature):
    """Rows of different lengths, max_new_tokens and stop rules in chunks of 3, a greedy row among sampled ones."""
    temperatures = [0.0, temperature, temperature, temperature]
    params = [SamplingParams(temperature=t, max_new_tokens=n, sampling_seed=seed, ignore_eos=True)
              for seed, (t, n) in enumerate(zip(temperatures, [12, 5, 16, 9], strict=True))]
    completions = HFGenerator(model, eos_token_ids(model), max_batch_size=3).generate(PROMPTS, params)
    stop = completions[2].output_ids[6]  # row 2 now stops at its first `stop`, while the others go on
    assert not set(eos_token_ids(model)) & set(completions[2].output_ids[:7])  # so only `stop` can end it there
    params[2] = dataclasses.replace(params[2], stop_token_ids=(stop,), ignore_eos=False)  # ignore_eos: no stops
    completions = HFGenerator(model, eos_token_ids(model), max_batch_size=3).generate(PROMPTS, params)
    assert [len(c.output_ids) for i, c in enumerate(completions) if i != 2] == [12, 5, 9]
    assert completions[2].finish_reason == {"type": "stop", "matched": stop}
    assert completions[2].output_ids[-1] == stop and stop not in completions[2].output_ids[:-1]
    for prompt, completion, row_temperature in zip(PROMPTS, completions, temperatures, strict=True):
        assert len(completion.output_logprobs) == len(completion.output_ids)
        reference = reference_logprobs(model, prompt, completion, row_temperature)
        torch.testing.assert_close(torch.tensor(completion.output_logprobs), reference, rtol=0, atol=TOL)
    greedy = teacher_forced_logits(model, PROMPTS[0], completions[0].output_ids).argmax(-1).tolist()
    assert completions[0].output_ids == greedy
    # negative control: had the padding been attended to, the check would see it
    padding = len(PROMPTS[3]) - len(PROMPTS[2])
    attended = reference_logprobs(model, [0] * padding + PROMPTS[2], completions[2], temperature)
    assert (torch.tensor(completions[2].output_logprobs) - attended).abs().max() > 100 * TOL


def test_greedy_is_argmax_with_untempered_logprobs(model):
    completions = HFGenerator(model, eos_token_ids(model)).generate(
        PROMPTS, [SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)] * len(PROMPTS))
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        logits = teacher_forced_logits(model, prompt, completion.output_ids)
        assert completion.output_ids == logits.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(completion.output_logprobs),
                                   reference_logprobs(model, prompt, completion, 1.0), rtol=0, atol=TOL)
    with torch.no_grad():  # and HF's own greedy decoding agrees
        hf = model.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                            pad_token_id=0)
    assert hf[0, len(PROMPTS[1]):].tolist() == completions[1].output_ids


def sampled_ranks(model, prompts, completions, temperature=1.0):
    """Rank (0 = most likely) of every sampled token and the probability mass of the tokens ranked above it."""
    ranks, mass_before = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        probs = torch.softmax(teacher_forced_logits(model, prompt, completion.output_ids) / temperature, -1)
        chosen = probs.gather(-1, torch.tensor(completion.output_ids)[:, None])
        ranks += (probs > chosen).sum(-1).tolist()
        mass_before += torch.where(probs > chosen, probs, 0.0).sum(-1).tolist()
    return ranks, mass_before


def test_top_k_and_top_p_filter_the_sampling_not_the_logprobs(qwen3_path):
    model = load_hf_model(qwen3_path)
    generator = HFGenerator(model, [])
    prompts = PROMPTS * 2

    def run(**sampling):
        params = [SamplingParams(max_new_tokens=40, sampling_seed=seed, **sampling) for seed in range(len(prompts))]
        completions = generator.generate(prompts, params)
        for prompt, completion in zip(prompts, completions, strict=True):  # full-vocabulary logprobs, unfiltered
            torch.testing.assert_close(torch.tensor(completion.output_logprobs),
                                       reference_logprobs(model, prompt, completion, 1.0), rtol=0, atol=TOL)
        return sampled_ranks(model, prompts, completions)

    ranks, _ = run(top_k=3)
    assert max(ranks) <= 2 and min(ranks) == 0
    _, mass_before = run(top_p=0.3)
    assert max(mass_before) <= 0.3 + 1e-5
    unfiltered_ranks, unfiltered_mass = run()  # negative control: without the filters both bounds are crossed
    assert max(unfiltered_ranks) > 2 and max(unfiltered_mass) > 0.3


def test_a_seeded_request_samples_the_same_tokens_alone_and_in_any_batch(model):
    prompt, seeded = PROMPTS[1], SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=24, sampling_seed=1234)
    generator = HFGenerator(model, [], max_batch_size=64)
    alone = generator.generate([prompt], [seeded])[0]
    others = [SamplingParams(max_new_tokens=n, sampling_seed=None) for n in (3, 30, 11)]
    batch = generator.generate([PROMPTS[3], PROMPTS[0], prompt, PROMPTS[2]], [others[0], others[1], seeded, others[2]])
    small_chunks = HFGenerator(model, [], max_batch_size=2).generate([PROMPTS[2], prompt, PROMPTS[0]],
                                                                     [others[2], seeded, others[0]])
    for together in (batch[2], small_chunks[1]):
        assert together.output_ids == alone.output_ids
        torch.testing.assert_close(together.output_logprobs, alone.output_logprobs, rtol=0, atol=TOL)
    other_seed = generator.generate([prompt], [SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=24,
                                                              sampling_seed=1235)])[0]
    assert other_seed.output_ids != alone.output_ids  # negative control: the seed matters


def test_eos_stop_tokens_ignore_eos_and_length(qwen3_path):
    model = load_hf_model(qwen3_path)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    free = HFGenerator(model, []).generate([PROMPTS[0]], [greedy])[0].output_ids
    assert free == HFGenerator(model, [free[0] + 1 if free[0] + 1 not in free else VOCAB - 1]).generate(
        [PROMPTS[0]], [greedy])[0].output_ids  # an eos id never produced changes nothing
    eos = next(t for t in free[3:] if t not in free[:3])
    first = free.index(eos)
    with_eos = HFGenerator(model, [eos])

    def run(**overrides):
        return with_eos.generate([PROMPTS[0]], [dataclasses.replace(greedy, **overrides)])[0]

    stopped = run()
    assert stopped.output_ids == free[:first + 1]  # the eos token is part of the output
    assert stopped.finish_reason == {"type": "stop", "matched": eos}
    assert run(ignore_eos=True).output_ids == free
    assert run(ignore_eos=True).finish_reason == {"type": "length", "length": 12}
    assert run(ignore_eos=True, stop_token_ids=(eos,)).finish_reason == {"type": "length", "length": 12}  # as SGLang
    stop = free[1]
    by_stop_id = HFGenerator(model, []).generate([PROMPTS[0]], [dataclasses.replace(greedy, stop_token_ids=(stop,))])[0]
    assert by_stop_id.output_ids == free[:free.index(stop) + 1]
    assert by_stop_id.finish_reason == {"type": "stop", "matched": stop}
    assert run(max_new_tokens=2).finish_reason == {"type": "length", "length": 2}
    assert run(max_new_tokens=0) == Completion([], [], {"type": "length", "length": 0})


def test_abort_returns_what_was_generated(qwen3_path):
    model = load_hf_model(qwen3_path)
    params = [SamplingParams(max_new_tokens=20, sampling_seed=seed, ignore_eos=True) for seed in range(3)]
    full = HFGenerator(model, []).generate(PROMPTS[:3], params)
    polls = []

    def abort_after_five_polls():
        polls.append(1)
        return len(polls) > 5

    aborted = HFGenerator(model, [], max_batch_size=2).generate(PROMPTS[:3], params, abort_after_five_polls)
    by_length = sorted(range(3), key=lambda i: len(PROMPTS[i]))  # the first chunk holds the two shortest prompts
    for i in by_length[:2]:  # polled before the prefill and after decode steps 1..5: 5 tokens each
        assert aborted[i].output_ids == full[i].output_ids[:5]
        torch.testing.assert_close(aborted[i].output_logprobs, full[i].output_logprobs[:5], rtol=0, atol=TOL)
    assert aborted[by_length[2]].output_ids == []  # the second chunk never started
    assert all(c.finish_reason == {"type": "abort", "message": "generation aborted"} for c in aborted)


def greedy_tokens(model) -> list[int]:
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    return HFGenerator(model, []).generate([PROMPTS[1]], [greedy])[0].output_ids


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_load_weights_copies_every_tensor_by_hf_name(name, tmp_path, qwen3_path, llama_path):
    path = qwen3_path if name == "qwen3" else llama_path
    source = load_hf_model(path)
    target_path = save_tiny(tmp_path / "other", type(source), source.config, seed=99)
    target = load_hf_model(target_path)
    assert greedy_tokens(target) != greedy_tokens(source)
    state = source.state_dict()  # tied: both embed_tokens and lm_head, one tensor
    loaded = HFGenerator(target, []).load_weights(state.items())
    assert loaded == len(state)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    assert greedy_tokens(target) == greedy_tokens(source)


def test_tied_embeddings_answer_to_both_names(qwen3_path):
    model = load_hf_model(qwen3_path)
    generator = HFGenerator(model, [])
    new = torch.randn(VOCAB, 64)
    assert generator.load_weights([("lm_head.weight", new)]) == 1
    assert torch.equal(model.model.embed_tokens.weight, new) and torch.equal(model.lm_head.weight, new)
    with pytest.raises(ValueError, match="'lm_head.weight' is tied to 'model.embed_tokens.weight'"):
        generator.load_weights([("model.embed_tokens.weight", new), ("lm_head.weight", new + 1)])
    assert torch.equal(model.lm_head.weight, new)


def test_untied_output_layer_is_its_own_tensor(llama_path):
    model = load_hf_model(llama_path)
    embedding = model.model.embed_tokens.weight.clone()
    HFGenerator(model, []).load_weights([("lm_head.weight", torch.zeros(VOCAB, 64))])
    assert torch.equal(model.model.embed_tokens.weight, embedding) and not model.lm_head.weight.any()


def test_bad_weights_load_nothing(qwen3_path):
    model = load_hf_model(qwen3_path)
    generator = HFGenerator(model, [])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = ("model.norm.weight", torch.zeros(64))
    cases = [
        ([good, ("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64))], KeyError,
         "unknown weight 'model.layers.9.mlp.up_proj.weight'"),
        ([good, ("model.layers.0.mlp.up_proj.weight", torch.zeros(64, 128))], ValueError,
         r"'model.layers.0.mlp.up_proj.weight': expected shape \(128, 64\) dtype torch.float32, got shape \(64, 128\)"),
        ([good, ("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 64, dtype=torch.bfloat16))], ValueError,
         "expected shape .* dtype torch.float32, got shape .* dtype torch.bfloat16"),
        ([good, good], ValueError, "'model.norm.weight' is given twice"),
    ]
    for tensors, error, message in cases:
        with pytest.raises(error, match=message):
            generator.load_weights(tensors)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    assert generator.load_weights([good]) == 1 and not model.model.norm.weight.any()  # the good one alone loads


def test_weights_by_name_is_the_flattened_prefix(qwen3_path):
    model = load_hf_model(qwen3_path)
    generator = HFGenerator(model, [])
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert generator.weights_by_name("model.layers.0.self_attn.q_proj.weight") == weight.flatten()[:100].tolist()
    assert generator.weights_by_name("lm_head.weight", 7) == model.model.embed_tokens.weight[0, :7].tolist()
    with pytest.raises(KeyError, match="unknown weight 'nope'"):
        generator.weights_by_name("nope")


def test_sampling_params_from_sglang_json():
    params = SamplingParams.from_dict({"temperature": 0, "top_p": 0.9, "top_k": 20, "max_new_tokens": 7,
                                       "stop_token_ids": [3, 4], "ignore_eos": True, "sampling_seed": 5})
    assert params == SamplingParams(0, 0.9, 20, 7, (3, 4), True, 5)
    assert SamplingParams.from_dict({}) == SamplingParams()
    assert SamplingParams.from_dict({"stop_token_ids": None, "sampling_seed": None}) == SamplingParams()
    with pytest.raises(ValueError, match="unknown key.*'stop'.*known keys: temperature, top_p, top_k"):
        SamplingParams.from_dict({"stop": ["\n"], "temperature": 1.0})
    bad = [("temperature", -0.5, ">= 0"), ("temperature", float("nan"), ">= 0"), ("top_p", 0.0, r"\(0, 1\]"),
           ("top_p", 1.5, r"\(0, 1\]"), ("top_k", 0, "-1 .* or an integer >= 1"), ("top_k", 2.5, "integer"),
           ("max_new_tokens", -1, ">= 0"), ("max_new_tokens", True, ">= 0"), ("stop_token_ids", ["a"], "token ids"),
           ("stop_token_ids", 3, "token ids"), ("ignore_eos", "yes", "true or false"),
           ("sampling_seed", 1.5, "integer or null")]
    for key, value, allowed in bad:
        message = rf"sampling_params\.{key}: expected .*{allowed}.*, got {re.escape(repr(value))}$"
        with pytest.raises(ValueError, match=message):
            SamplingParams.from_dict({key: value})


def test_generate_rejects_bad_requests(qwen3_path):
    generator = HFGenerator(load_hf_model(qwen3_path), [1])
    ok = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        generator.generate([[1], [2]], [ok])
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a non-empty list"):
        generator.generate([[1], []], [ok, ok])
    with pytest.raises(ValueError, match=rf"prompts\[0\]: token id {VOCAB} is not an integer in \[0, {VOCAB}\)"):
        generator.generate([[1, VOCAB]], [ok])
    with pytest.raises(ValueError, match=r"prompts\[0\]: 10 prompt tokens \+ max_new_tokens 250 exceed .* 256"):
        generator.generate([[1] * 10], [SamplingParams(max_new_tokens=250)])
    with pytest.raises(ValueError, match="max_batch_size: expected an integer >= 1, got 0"):
        HFGenerator(generator.model, [], max_batch_size=0)


def test_load_hf_model_needs_a_local_safetensors_checkpoint(qwen3_path, tmp_path):
    model = load_hf_model(qwen3_path, dtype=torch.bfloat16)
    assert not model.training and model.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_model(str(tmp_path))
    (tmp_path / "config.json").write_text((Path(qwen3_path) / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights \(found pytorch_model.bin"):
        load_hf_model(str(tmp_path))
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        load_hf_model(qwen3_path, dtype=torch.int64)


def test_eos_token_ids_from_generation_and_model_config(qwen3_path, llama_path):
    assert eos_token_ids(load_hf_model(qwen3_path)) == [1]
    assert eos_token_ids(load_hf_model(llama_path)) == [1, 2]
    model = load_hf_model(qwen3_path)
    model.generation_config = GenerationConfig(eos_token_id=[7, 1])
    assert eos_token_ids(model) == [7, 1]


def test_bench_generation_quick_prints_the_table():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_generation.py"), "--quick"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for batch_size in (1, 4):
        assert re.search(rf"^\s+{batch_size}(\s+\d+){{4}}\s+\d+\.\d\d$", out.stdout, re.MULTILINE), out.stdout

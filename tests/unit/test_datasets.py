"""Prompt files: exact counts per malformed reason, exact prompt ids, Parquet like JSONL, and the sampler's resume."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_rl.data.datasets import Prompt, PromptSampler, check_token_ids, load_prompts

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
WORDS = ["system", "user", "assistant", "\n", "What", "is", "Add", "Be", "brief", "?", ".", "+", "2", "3", "5"]
VOCAB = {token: index for index, token in enumerate(SPECIAL + WORDS)}
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MAX_LEN = 24


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Word level: every word, digit, symbol and newline is one token of VOCAB; spaces separate."""
    tokenizer = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" +"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n|\d|[A-Za-z]+|[^\sA-Za-z\d]"), behavior="isolated"),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = chat_template
    return fast


def ids(*tokens: str) -> list[int]:
    return [VOCAB[token] for token in tokens]


def chatml_ids(*turns: tuple[str, list[str]]) -> list[int]:
    """Token ids of ChatML turns [(role, content tokens)] followed by the generation prompt."""
    out = []
    for role, content in turns:
        out += ids("<|im_start|>", role, "\n", *content, "<|im_end|>", "\n")
    return out + ids("<|im_start|>", "assistant", "\n")


TOO_LONG = " + ".join(["2"] * 10)  # 19 content tokens: 27 with the template > MAX_LEN = 24
GOOD_ROWS = [
    {"prompt": "What is 2 + 3?", "answer": "5", "source": "a", "level": 1},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 2?"}],
     "answer": 5},
    {"prompt": "Add 2 + 2"},  # no answer: kept
]
GOOD_IDS = [
    chatml_ids(("user", ["What", "is", "2", "+", "3", "?"])),
    chatml_ids(("system", ["Be", "brief", "."]), ("user", ["What", "is", "3", "+", "2", "?"])),
    chatml_ids(("user", ["Add", "2", "+", "2"])),
]
JSONL_LINES = [json.dumps(row).encode() for row in GOOD_ROWS] + [
    b"",                                                      # line 4: blank, not a row
    json.dumps({"prompt": 7, "answer": "7"}).encode(),        # line 5: bad_prompt
    b'{"prompt": "What is 2", "answer": ',                    # line 6: bad_json
    b'{"prompt": "What is \xff\xfe 2?", "answer": "2"}',      # line 7: not_utf8
    json.dumps({"answer": "1"}).encode(),                     # line 8: no_prompt
    json.dumps({"prompt": "  ", "answer": "1"}).encode(),     # line 9: empty_prompt
    json.dumps({"prompt": "What is 2?", "answer": ["2"]}).encode(),                          # line 10: bad_answer
    json.dumps({"messages": [{"role": "user"}], "answer": "1"}).encode(),                    # line 11: bad_messages
    json.dumps({"prompt": "Add 2", "messages": [{"role": "user", "content": "Add 3"}]}).encode(),  # 12: both
    b"[1, 2]",                                                # line 13: not_an_object
    json.dumps({"prompt": TOO_LONG, "answer": "20"}).encode(),  # line 14: too long
]
TRUNCATED = b'{"prompt": "What is 3 +'  # line 15: no newline, cut off


def write_jsonl(path, lines: list[bytes], truncated_tail: bytes = b""):
    path.write_bytes(b"".join(line + b"\n" for line in lines) + truncated_tail)
    return path


def test_jsonl_counts_every_reason_and_keeps_exact_ids(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", JSONL_LINES, TRUNCATED)
    prompts, report = load_prompts(path, make_tokenizer(), max_prompt_length=MAX_LEN)

    assert [p.prompt_ids for p in prompts] == GOOD_IDS
    assert [p.index for p in prompts] == [0, 1, 2]
    assert [p.answer for p in prompts] == ["5", "5", None]
    assert [p.metadata for p in prompts] == [{"source": "a", "level": 1}, {}, {}]
    assert report.rows == 14 and report.kept == 3 and report.too_long == 1 and report.no_answer == 1
    assert report.malformed == {"bad_prompt": 1, "bad_json": 1, "not_utf8": 1, "no_prompt": 1, "empty_prompt": 1,
                                "bad_answer": 1, "bad_messages": 1, "prompt_and_messages": 1, "not_an_object": 1,
                                "truncated_line": 1}
    assert report.first_errors == [
        "line 5: 'prompt' must be a string, got int",
        "line 6: not valid JSON: Expecting value: column 35",
        "line 7: not valid UTF-8 (byte 20)",
        "line 8: has neither 'prompt' nor 'messages'",
        "line 9: 'prompt' is empty",
    ]
    text = str(report)
    assert text.startswith(f"{path}: kept 3 of 14 rows; 10 malformed (bad_answer 1, bad_json 1, ")
    assert "1 longer than 24 tokens; 1 kept without an answer." in text
    assert "\n" not in text


def test_every_message_names_its_line(tmp_path):
    """The reasons not in first_errors, one file each."""
    expected = {
        10: ("bad_answer", "line 1: 'answer' must be a string or a finite number, got ['2']"),
        11: ("bad_messages", "line 1: 'messages'[0] must be {'role': str, 'content': str}, got {'role': 'user'}"),
        12: ("prompt_and_messages", "line 1: has both 'prompt' and 'messages'; expected one"),
        13: ("not_an_object", "line 1: expected a JSON object, got list"),
    }
    for line_number, (reason, message) in expected.items():
        path = write_jsonl(tmp_path / f"{reason}.jsonl", [JSONL_LINES[line_number - 1], JSONL_LINES[0]])
        _, report = load_prompts(path, make_tokenizer(), max_prompt_length=MAX_LEN)
        assert report.malformed == {reason: 1} and report.first_errors == [message]
    path = write_jsonl(tmp_path / "cut.jsonl", [JSONL_LINES[0]], TRUNCATED)
    _, report = load_prompts(path, make_tokenizer(), max_prompt_length=MAX_LEN)
    assert report.first_errors == ["line 2: the last line is cut off: Unterminated string starting at: column 12"]


def test_max_prompt_length_is_inclusive(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [JSONL_LINES[0]])
    length = len(GOOD_IDS[0])
    prompts, report = load_prompts(path, make_tokenizer(), max_prompt_length=length)
    assert prompts[0].prompt_ids == GOOD_IDS[0] and report.too_long == 0
    with pytest.raises(ValueError, match=f"kept 0 of 1 rows; 1 longer than {length - 1} tokens"):
        load_prompts(path, make_tokenizer(), max_prompt_length=length - 1)


def test_system_prompt_goes_before_prompt_strings_only(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", JSONL_LINES[:2])
    prompts, _ = load_prompts(path, make_tokenizer(), max_prompt_length=MAX_LEN, system_prompt="Be brief.")
    assert prompts[0].prompt_ids == chatml_ids(("system", ["Be", "brief", "."]),
                                               ("user", ["What", "is", "2", "+", "3", "?"]))
    assert prompts[1].prompt_ids == GOOD_IDS[1]


def test_messages_under_the_prompt_key(tmp_path):
    """verl's layout: messages_key == prompt_key, the value's type decides."""
    rows = [{"prompt": [{"role": "user", "content": "Add 2"}]}, {"prompt": "Add 3"}, {"prompt": 5}]
    path = write_jsonl(tmp_path / "verl.jsonl", [json.dumps(row).encode() for row in rows])
    prompts, report = load_prompts(path, make_tokenizer(), messages_key="prompt", max_prompt_length=MAX_LEN)
    assert [p.prompt_ids for p in prompts] == [chatml_ids(("user", ["Add", "2"])), chatml_ids(("user", ["Add", "3"]))]
    assert report.first_errors == ["line 3: 'prompt' must be a string or a list of messages, got int"]


def test_without_chat_template_prompts_are_raw_text(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", JSONL_LINES[:3])
    tokenizer = make_tokenizer(chat_template=None)
    prompts, report = load_prompts(path, tokenizer, max_prompt_length=MAX_LEN)
    assert [p.prompt_ids for p in prompts] == [ids("What", "is", "2", "+", "3", "?"), ids("Add", "2", "+", "2")]
    assert report.malformed == {"no_chat_template": 1}
    assert report.first_errors == ["line 2: 'messages' holds messages but the tokenizer has no chat template"]
    assert str(report).count("no chat template: each prompt is its raw text") == 1
    with pytest.raises(ValueError, match="system_prompt needs a tokenizer with a chat template"):
        load_prompts(path, tokenizer, max_prompt_length=MAX_LEN, system_prompt="Be brief.")


def test_a_failing_chat_template_skips_the_row(tmp_path):
    template = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                "{{ raise_exception('no system role') }}{% endif %}{% endfor %}" + CHATML)
    path = write_jsonl(tmp_path / "train.jsonl", JSONL_LINES[:2])
    prompts, report = load_prompts(path, make_tokenizer(template), max_prompt_length=MAX_LEN)
    assert [p.prompt_ids for p in prompts] == GOOD_IDS[:1]
    assert report.malformed == {"chat_template_error": 1}
    assert report.first_errors[0].startswith("line 2: the chat template failed: TemplateError: no system role")


PARQUET_ROWS = [
    {"prompt": "What is 2 + 3?", "messages": None, "answer": "5", "source": "a"},
    {"prompt": None, "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 3 + 2?"}], "answer": "5", "source": None},
    {"prompt": "Add 2 + 2", "messages": None, "answer": None, "source": None},
    {"prompt": "", "messages": None, "answer": "1", "source": None},                            # empty_prompt
    {"prompt": None, "messages": None, "answer": "1", "source": None},                          # no_prompt
    {"prompt": "Add 2", "messages": [{"role": "user", "content": "Add"}], "answer": None, "source": None},  # both
    {"prompt": None, "messages": [{"role": "user", "content": None}], "answer": "1", "source": None},  # bad
    {"prompt": TOO_LONG, "messages": None, "answer": "20", "source": None},                    # too long
]


def test_parquet_like_jsonl_across_row_groups(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(PARQUET_ROWS), path, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 3
    prompts, report = load_prompts(path, make_tokenizer(), max_prompt_length=MAX_LEN)
    assert [p.prompt_ids for p in prompts] == GOOD_IDS
    assert [(p.index, p.answer, p.metadata) for p in prompts] == [(0, "5", {"source": "a"}), (1, "5", {"source": None}),
                                                                 (2, None, {"source": None})]
    assert (report.rows, report.kept, report.too_long, report.no_answer) == (8, 3, 1, 1)
    assert report.malformed == {"empty_prompt": 1, "no_prompt": 1, "prompt_and_messages": 1, "bad_messages": 1}
    assert report.first_errors[0] == "row 3: 'prompt' is empty"
    assert report.first_errors[3] == ("row 6: 'messages'[0] must be {'role': str, 'content': str}, "
                                      "got {'role': 'user', 'content': None}")


def test_parquet_with_an_ill_typed_column_fails_with_counts(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"prompt": [1, 2, 3], "answer": ["1", "2", "3"]}), path)
    with pytest.raises(ValueError, match=r"no usable prompt in .*ints.parquet: .*kept 0 of 3 rows; 3 malformed "
                                         r"\(bad_prompt 3\).*row 0: 'prompt' must be a string, got int"):
        load_prompts(path, make_tokenizer(), max_prompt_length=MAX_LEN)


def test_file_level_errors_name_the_path(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_prompts(tmp_path / "missing.jsonl", tokenizer, max_prompt_length=MAX_LEN)
    (tmp_path / "train.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=r"train.csv: unknown extension '.csv'"):
        load_prompts(tmp_path / "train.csv", tokenizer, max_prompt_length=MAX_LEN)
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    with pytest.raises(ValueError, match=r"no usable prompt in .*empty.jsonl: .*kept 0 of 0 rows"):
        load_prompts(tmp_path / "empty.jsonl", tokenizer, max_prompt_length=MAX_LEN)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="broken.parquet: not a readable Parquet file"):
        load_prompts(tmp_path / "broken.parquet", tokenizer, max_prompt_length=MAX_LEN)


def make_prompts(count: int) -> list[Prompt]:
    return [Prompt(index, [index], str(index), {}) for index in range(count)]


def indices(batch: list[Prompt]) -> list[int]:
    return [p.index for p in batch]


def test_sampler_epochs_are_seeded_permutations_joined_across_batches():
    sampler = PromptSampler(make_prompts(5), seed=3)
    drawn = [i for _ in range(4) for i in indices(sampler.next_batch(3))]  # 12 = 2 epochs + 2
    epochs = [list(range(5)) for _ in range(3)]
    for epoch, order in enumerate(epochs):
        random.Random(f"3:{epoch}").shuffle(order)
    assert drawn == (epochs[0] + epochs[1] + epochs[2])[:12]
    assert sorted(drawn[:5]) == sorted(drawn[5:10]) == list(range(5)) and drawn[:5] != drawn[5:10]
    assert (sampler.epoch, sampler.position, sampler.drawn) == (2, 2, 12)
    assert indices(PromptSampler(make_prompts(5), seed=4).next_batch(5)) != drawn[:5]


@pytest.mark.parametrize("saved_after", [1, 2, 5])  # mid-epoch, mid-batch across epochs, at an epoch's end
def test_sampler_resumes_with_exactly_the_same_prompts(saved_after):
    original = PromptSampler(make_prompts(7), seed=11)
    for _ in range(saved_after):
        original.next_batch(7 if saved_after == 5 else 4)
    state = json.loads(json.dumps(original.state_dict()))  # as a checkpoint stores it
    resumed = PromptSampler(make_prompts(7), seed=11)
    resumed.load_state_dict(state)
    assert [indices(resumed.next_batch(3)) for _ in range(6)] == [indices(original.next_batch(3)) for _ in range(6)]


def test_sampler_rejects_bad_input():
    sampler = PromptSampler(make_prompts(4), seed=0)
    with pytest.raises(ValueError, match="seed = 1, this sampler has 0"):
        sampler.load_state_dict({"seed": 1, "num_prompts": 4, "epoch": 0, "position": 0})
    with pytest.raises(ValueError, match="num_prompts = 5, this sampler has 4"):
        sampler.load_state_dict({"seed": 0, "num_prompts": 5, "epoch": 0, "position": 0})
    with pytest.raises(ValueError, match=r"lacks \['position'\]"):
        sampler.load_state_dict({"seed": 0, "num_prompts": 4, "epoch": 0})
    with pytest.raises(ValueError, match="0 <= position <= 4"):
        sampler.load_state_dict({"seed": 0, "num_prompts": 4, "epoch": 0, "position": 5})
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        sampler.next_batch(0)
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptSampler([], seed=0)


def test_token_ids_outside_the_models_vocabulary_name_the_row():
    prompts = [Prompt(0, [1, 2], "1", {}), Prompt(3, [4, 9, 2], "2", {}), Prompt(4, [-1], None, {})]
    check_token_ids(prompts[:1], vocab_size=3, path="p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl: row 3: token id 4 is outside .*model.vocab_size = 3"):
        check_token_ids(prompts, vocab_size=3, path="p.jsonl")
    with pytest.raises(ValueError, match=r"row 4: token id -1"):
        check_token_ids(prompts, vocab_size=10, path="p.jsonl")

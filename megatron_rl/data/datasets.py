"""Prompt sets: JSONL or Parquet rows -> chat-templated prompt ids, and a resumable sampler over them.

    prompts, report = load_prompts("train.jsonl", tokenizer, max_prompt_length=512)
    sampler = PromptSampler(prompts, seed=42)
    batch = sampler.next_batch(8)          # list[Prompt]
    state = sampler.state_dict()           # {"seed", "num_prompts", "epoch", "position"}

A row (a JSON object per line of a .jsonl / .json file, or a row of a .parquet file) holds either a
prompt string under `prompt_key`, sent as one user message after the optional system prompt, or a
list of {"role": str, "content": str} messages under `messages_key`, used as they are. The two keys
may be the same column (verl's Parquet files keep messages under "prompt"): the value's type decides.
The reference answer under `answer_key` is optional (a string, or a number kept as its str()); every
other key of the row goes to `Prompt.metadata`, for the reward function.

    prompt_ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                           tokenize=False), add_special_tokens=False).input_ids

the template writes the special tokens itself. A tokenizer without a chat template tokenizes the
prompt string as it is, with its own special tokens (a base model's BOS); rows of messages then
have no rendering and are counted as malformed.

A bad row never stops the load: it is skipped and counted under its reason (not_utf8, bad_json,
truncated_line, not_an_object, no_prompt, prompt_and_messages, bad_prompt, bad_messages,
empty_prompt, bad_answer, no_chat_template, chat_template_error), and the first messages are kept,
e.g. "line 18: 'prompt' must be a string, got int". Prompts longer than `max_prompt_length` tokens
are dropped and counted. Rows are numbered from 0; for JSON Lines a row's number is its line
number - 1 (blank lines are not rows, but keep the numbering).
"""

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import batched
from pathlib import Path
from typing import Any

JSON_LINES_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
FIRST_ERRORS_KEPT = 5
TOKENIZE_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class Prompt:
    index: int  # row number in the file, from 0
    prompt_ids: list[int]
    answer: str | None
    metadata: dict


@dataclass
class LoadReport:
    """What `load_prompts` read: rows = kept + sum(malformed) + too_long."""

    path: str
    max_prompt_length: int
    rows: int = 0
    kept: int = 0
    malformed: dict[str, int] = field(default_factory=dict)  # reason -> rows
    too_long: int = 0  # well-formed rows whose prompt has more than max_prompt_length tokens
    no_answer: int = 0  # kept rows without a reference answer
    first_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def count_malformed(self, reason: str, message: str) -> None:
        self.malformed[reason] = self.malformed.get(reason, 0) + 1
        if len(self.first_errors) < FIRST_ERRORS_KEPT:
            self.first_errors.append(message)

    def __str__(self) -> str:
        text = f"{self.path}: kept {self.kept} of {self.rows} rows"
        if self.malformed:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.malformed.items()))
            text += f"; {sum(self.malformed.values())} malformed ({reasons})"
        text += f"; {self.too_long} longer than {self.max_prompt_length} tokens"
        text += f"; {self.no_answer} kept without an answer."
        for note in self.notes:
            text += f" {note}."
        if self.first_errors:
            text += " First errors: " + "; ".join(self.first_errors) + "."
        return text


class RowError(Exception):
    """A row that cannot become a prompt; `reason` is its counting key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_prompts(path: str | Path, tokenizer, *, prompt_key: str = "prompt", messages_key: str = "messages",
                 answer_key: str = "answer", max_prompt_length: int,
                 system_prompt: str | None = None) -> tuple[list[Prompt], LoadReport]:
    """Read, check, template and tokenize every row of a prompt file; return the kept prompts and the report.

    Raises FileNotFoundError if `path` is not a file, ValueError for an unknown extension, an unreadable
    Parquet file, a system prompt without a chat template, or a file that yields no usable prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix in JSON_LINES_SUFFIXES:
        rows = _json_lines_rows(path)
    elif suffix in PARQUET_SUFFIXES:
        rows = _parquet_rows(path)
    else:
        raise ValueError(f"prompt file {path}: unknown extension {path.suffix!r}; expected one of "
                         f"{', '.join(JSON_LINES_SUFFIXES + PARQUET_SUFFIXES)} (.json holds JSON Lines)")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if system_prompt is not None and not has_template:
        raise ValueError(f"data.system_prompt needs a tokenizer with a chat template; this tokenizer has none "
                         f"(prompt file {path})")

    report = LoadReport(path=str(path), max_prompt_length=max_prompt_length)
    if not has_template:
        report.notes.append("The tokenizer has no chat template: each prompt is its raw text")
    keys = (prompt_key, messages_key, answer_key)
    prompts: list[Prompt] = []
    for chunk in batched(rows, TOKENIZE_CHUNK_ROWS):
        rendered = []  # (index, text, answer, metadata)
        for index, where, row in chunk:
            report.rows += 1
            try:
                rendered.append(_render_row(index, row, tokenizer, keys, system_prompt, has_template))
            except RowError as error:
                report.count_malformed(error.reason, f"{where}: {error}")
        texts = [text for _, text, _, _ in rendered]
        ids = tokenizer(texts, add_special_tokens=not has_template)["input_ids"] if texts else []
        for (index, _, answer, metadata), prompt_ids in zip(rendered, ids, strict=True):
            if len(prompt_ids) > max_prompt_length:
                report.too_long += 1
                continue
            if answer is None:
                report.no_answer += 1
            prompts.append(Prompt(index, list(prompt_ids), answer, metadata))
    report.kept = len(prompts)
    if not prompts:
        raise ValueError(f"no usable prompt in {path}: {report}")
    return prompts, report


def _json_lines_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(row number, "line N", the decoded object or a RowError) for every non-blank line."""
    with path.open("rb") as lines:
        for index, line in enumerate(lines):
            where = f"line {index + 1}"
            if not line.strip():
                continue
            try:
                text = line.rstrip(b"\r\n").decode("utf-8-sig" if index == 0 else "utf-8")
            except UnicodeDecodeError as error:
                yield index, where, RowError("not_utf8", f"not valid UTF-8 (byte {error.start})")
                continue
            try:
                yield index, where, json.loads(text)
            except json.JSONDecodeError as error:
                if not line.endswith(b"\n"):
                    yield index, where, RowError("truncated_line", f"the last line is cut off: {error.msg}: "
                                                                   f"column {error.colno}")
                else:
                    yield index, where, RowError("bad_json", f"not valid JSON: {error.msg}: column {error.colno}")


def _parquet_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(row number, "row N", the row as a dict), read one batch of a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=TOKENIZE_CHUNK_ROWS):
            for row in batch.to_pylist():
                yield index, f"row {index}", row
                index += 1
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"prompt file {path}: not a readable Parquet file (after {index} rows): {error}") from error


def _render_row(index: int, row: Any, tokenizer, keys: tuple[str, str, str], system_prompt: str | None,
                has_template: bool) -> tuple[int, str, str | None, dict]:
    """(index, text to tokenize, answer, metadata) of one row, or RowError."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {_type_name(row)}")
    prompt_key, messages_key, answer_key = keys
    present = [key for key in dict.fromkeys((prompt_key, messages_key)) if row.get(key) is not None]
    if not present:
        raise RowError("no_prompt", f"has neither {prompt_key!r} nor {messages_key!r}")
    if len(present) == 2:
        raise RowError("prompt_and_messages", f"has both {prompt_key!r} and {messages_key!r}; expected one")
    key = present[0]
    value = row[key]
    if key == messages_key and isinstance(value, list):
        messages = _checked_messages(key, value)
    elif key == prompt_key and isinstance(value, str):
        if not value.strip():
            raise RowError("empty_prompt", f"{key!r} is empty")
        messages = [{"role": "user", "content": value}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
    else:
        expected = {prompt_key: "a string", messages_key: "a list of messages"}
        if prompt_key == messages_key:
            expected[key] = "a string or a list of messages"
        reason = "bad_prompt" if key == prompt_key else "bad_messages"
        raise RowError(reason, f"{key!r} must be {expected[key]}, got {_type_name(value)}")
    answer = _checked_answer(answer_key, row.get(answer_key))

    if not has_template:
        if not isinstance(value, str):
            raise RowError("no_chat_template", f"{key!r} holds messages but the tokenizer has no chat template")
        text = value
    else:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # a template's raise_exception(), or a Jinja error on this row's messages
            message = f"the chat template failed: {type(error).__name__}: {error}"
            raise RowError("chat_template_error", message) from error
    metadata = {name: item for name, item in row.items() if name not in keys}
    return index, text, answer, metadata


def _checked_messages(key: str, messages: list) -> list[dict]:
    if not messages:
        raise RowError("empty_prompt", f"{key!r} is an empty list")
    for position, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise RowError("bad_messages", f"{key!r}[{position}] must be {{'role': str, 'content': str}}, "
                                           f"got {_short(message)}")
    return messages


def _checked_answer(key: str, answer: Any) -> str | None:
    if answer is None or isinstance(answer, str):
        return answer
    if isinstance(answer, int | float) and not isinstance(answer, bool) and math.isfinite(answer):
        return str(answer)
    raise RowError("bad_answer", f"{key!r} must be a string or a finite number, got {_short(answer)}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_token_ids(prompts: Sequence[Prompt], vocab_size: int, path: str | Path) -> None:
    """ValueError naming the first row whose prompt has a token id outside [0, vocab_size): the tokenizer and
    the model disagree (an engine would index past its embedding: real SGLang dies of it)."""
    for prompt in prompts:
        bad = next((token for token in prompt.prompt_ids if not 0 <= token < vocab_size), None)
        if bad is not None:
            raise ValueError(f"{path}: row {prompt.index}: token id {bad} is outside the model's vocabulary "
                             f"(model.vocab_size = {vocab_size}); is data.tokenizer_path the model's tokenizer?")


class PromptSampler:
    """Endless shuffled epochs over a prompt list, seeded and resumable.

    Epoch e visits every prompt once, in the order of a permutation drawn from random.Random(f"{seed}:{e}");
    a batch that reaches the end of an epoch continues with the next one. The state is the cursor
    (epoch, position), so a sampler restored with load_state_dict yields exactly the batches the
    original would have yielded.
    """

    def __init__(self, prompts: Sequence[Prompt], seed: int):
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    @property
    def drawn(self) -> int:
        """How many prompts all batches so far have taken (epoch x prompts + position)."""
        return self.epoch * len(self.prompts) + self.position

    def next_batch(self, n: int) -> list[Prompt]:
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        batch: list[Prompt] = []
        while len(batch) < n:
            if self.position == len(self.prompts):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            end = min(self.position + n - len(batch), len(self.prompts))
            batch.extend(self.prompts[i] for i in self._order[self.position:end])
            self.position = end
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_prompts": len(self.prompts), "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Restore the cursor; the seed and the number of prompts must be those the state was saved with."""
        missing = {"seed", "num_prompts", "epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}; got keys {sorted(state)}")
        for key, mine in (("seed", self.seed), ("num_prompts", len(self.prompts))):
            if state[key] != mine:
                raise ValueError(f"sampler state was saved with {key} = {state[key]}, this sampler has {mine}: "
                                 "resuming would not continue the same prompt sequence")
        if not (state["epoch"] >= 0 and 0 <= state["position"] <= len(self.prompts)):
            raise ValueError(f"sampler state has epoch {state['epoch']}, position {state['position']}; expected "
                             f"epoch >= 0 and 0 <= position <= {len(self.prompts)}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)

"""The pipe tables of docs/*.md as the tests that keep those pages true read them.

- `markdown_tables`: every table of a page (docs/config.md, docs/metrics.md);
- `documented_metrics`: docs/metrics.md's rows, name -> {column: cell}, from every table whose first
  header cell is `metric` and whose first cells are each one name in backticks;
- `is_documented` / `name_pattern`: a name's match against them, where `{anything}` in a documented name
  stands for any non-empty text (`train/trm/reject_rate_len_{lo}-{hi}`).
"""

import re
from pathlib import Path

METRICS_DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")
_ONE_NAME = re.compile(r"^`([^`\s]+)`$")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every pipe table of `text` as (header cells, body rows), cells stripped, `\\|` unescaped."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            inner = line.strip().removeprefix("|").removesuffix("|")
            block.append([cell.strip().replace("\\|", "|") for cell in _UNESCAPED_PIPE.split(inner)])
        elif block:
            header, separator, *rows = block
            assert all(set(cell) <= set("-: ") for cell in separator), f"not a table separator: {separator}"
            tables.append((header, rows))
            block = []
    return tables


def documented_metrics(text: str | None = None) -> dict[str, dict[str, str]]:
    """name (or pattern) -> its row as {header cell: cell} for every `metric` table of docs/metrics.md."""
    rows: dict[str, dict[str, str]] = {}
    for header, body in markdown_tables(METRICS_DOC.read_text() if text is None else text):
        if header[0] != "metric":
            continue
        for row in body:
            assert len(row) == len(header), f"row {row} has {len(row)} cells, the header {len(header)}"
            match = _ONE_NAME.match(row[0])
            assert match, f"metric cell {row[0]!r} is not one `name`"
            assert match[1] not in rows, f"{match[1]} is documented twice"
            rows[match[1]] = dict(zip(header, row, strict=True))
    return rows


def name_pattern(documented: str) -> re.Pattern:
    """The regular expression of a documented name: itself, each `{...}` standing for any non-empty text."""
    parts = _PLACEHOLDER.split(documented)
    return re.compile(".+".join(map(re.escape, parts)) + r"\Z")


def is_documented(name: str, documented: dict[str, object]) -> bool:
    return any(name_pattern(pattern).match(name) for pattern in documented)

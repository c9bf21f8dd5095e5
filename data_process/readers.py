"""Reading user files, one record at a time, with errors that name the file, the line and the fix.

Accepted: .txt (a document per line, or documents separated by blank lines), .jsonl/.json, .csv, .parquet,
a directory written by `datasets.save_to_disk`, or a directory holding such files. JSON lines are parsed
here (exact line numbers in errors); JSON arrays, CSV and Parquet stream through `datasets`.

Every file's rows must share one of these field sets (the first row decides the kind):
text -> pretrain | messages, prompt+response, instruction(+input)+output -> sft |
prompt+chosen+rejected -> preference | prompt -> PPO prompts.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import UserError

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
DATASETS_SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
SUPPORTED = (*TEXT_SUFFIXES, *JSONL_SUFFIXES, *DATASETS_SUFFIXES)
ROLES = ("system", "user", "assistant")
KINDS_HELP = ("text | messages | prompt+response | instruction+input+output | prompt+chosen+rejected | prompt")
ENCODING_GUESSES = ("utf-16", "gb18030", "big5", "shift_jis", "cp1252")


@dataclass
class Record:
    """One row of user data in canonical form: `kind` is pretrain, sft, preference or prompts; `data` holds
    the dataset's columns ({"text"}, {"messages"}, {"prompt", "chosen", "rejected"} or {"prompt"})."""

    kind: str
    data: dict[str, Any]
    where: str


def guess_encoding(raw: bytes) -> str:
    """The first common encoding that decodes `raw` cleanly (a guess for the error message)."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    for enc in ENCODING_GUESSES[1:]:
        try:  # incremental: a character cut at the end of the sample is not an error
            codecs.getincrementaldecoder(enc)().decode(raw, final=False)
        except UnicodeDecodeError:
            continue
        return enc
    return "unknown"


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline) of a UTF-8 file; a UserError at the first bad byte."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                f.seek(0)
                enc = guess_encoding(f.read(1 << 16))
                raise UserError(
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); it "
                    f"looks like {enc}: convert it, e.g. `iconv -f {enc} -t UTF-8 {path.name} > "
                    f"{path.stem}.utf8{path.suffix}`") from None
            yield number, line.rstrip("\r\n")


def _text_documents(path: Path, txt_mode: str) -> Iterator[tuple[str, str]]:
    """(where, document) from a .txt file: one per line, or paragraphs separated by blank lines
    (`auto` picks paragraphs when the first 1 MB holds a blank line)."""
    if txt_mode == "auto":
        with open(path, "rb") as f:
            head = f.read(1 << 20).replace(b"\r\n", b"\n")
        txt_mode = "paragraph" if b"\n\n" in head.strip(b"\n") else "line"
    buffer: list[str] = []
    start = 0
    for number, line in _decoded_lines(path):
        if txt_mode == "line":
            if line.strip():
                yield f"{path}:{number}", line
        elif line.strip():
            start = start or number
            buffer.append(line)
        elif buffer:
            yield f"{path}:{start}", "\n".join(buffer)
            buffer, start = [], 0
    if buffer:
        yield f"{path}:{start}", "\n".join(buffer)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}); each line "
                            "must be one JSON object, e.g. {\"text\": \"...\"}") from None
        yield f"{path}:{number}", row


def _datasets_rows(path: Path, fmt: str | None) -> Iterator[tuple[str, Any]]:
    """Rows of a JSON array / CSV / Parquet file (streamed) or a save_to_disk directory (memory-mapped)."""
    import datasets

    try:
        if fmt is None:
            loaded = datasets.load_from_disk(str(path))
            parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
        else:
            parts = [datasets.load_dataset(fmt, data_files=str(path), split="train", streaming=True)]
        number = 0
        for part in parts:
            for row in part:
                number += 1
                yield f"{path} row {number}", row
    except UserError:
        raise
    except Exception as err:  # datasets/pyarrow raise many types for one cause: the file is not valid
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = fmt.upper() if fmt else "a datasets.save_to_disk directory"
        raise UserError(f"{path}: cannot be read as {what} ({first[:200]}); check the file is valid "
                        f"{what}, or convert it to JSON lines") from None


def _as_text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__} "
                        f"{json.dumps(value, ensure_ascii=False)[:60]}")
    return value


def row_kind(row: Any, where: str) -> str:
    """Which dataset a row feeds, from its field names."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with fields ({KINDS_HELP}), got "
                        f"{type(row).__name__}")
    keys = set(row)
    if "messages" in keys:
        return "sft"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "response"} <= keys or {"instruction", "output"} <= keys:
        return "sft"
    if "text" in keys:
        return "pretrain"
    if "prompt" in keys:
        return "prompts"
    raise UserError(f"{where}: no known fields (found: {', '.join(sorted(keys)) or 'none'}); "
                    f"rows need one of: {KINDS_HELP}")


REQUIRED = {"pretrain": ("text",), "preference": ("prompt", "chosen", "rejected"), "prompts": ("prompt",)}


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field 'messages' must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise UserError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise UserError(f"{where}: messages[{i}].role={msg['role']!r}; use one of {', '.join(ROLES)}")
        out.append({"role": msg["role"], "content": _as_text(msg["content"], where, f"messages[{i}].content")})
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
    return out


def canonical(kind: str, row: dict[str, Any], where: str) -> dict[str, Any]:
    """The row in its dataset's columns; a UserError naming the missing or mistyped field."""
    def need(name: str) -> str:
        if name not in row or row[name] is None:
            raise UserError(f"{where}: missing field {name!r} (found: {', '.join(sorted(row))}); this "
                            f"file's first row made it a {kind} file, so every row needs the same fields")
        return _as_text(row[name], where, name)

    if kind in REQUIRED:
        return {name: need(name) for name in REQUIRED[kind]}
    if "messages" in row:
        return {"messages": _messages(row["messages"], where)}
    if "instruction" in row:
        user = need("instruction")
        extra = row.get("input") or ""
        user = f"{user}\n{_as_text(extra, where, 'input')}" if extra else user
        answer = need("output")
    else:
        user, answer = need("prompt"), need("response")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _files(path: Path) -> list[Path]:
    """The input files under one --input path (a directory is searched recursively, sorted)."""
    if not path.exists():
        raise UserError(f"--input {path}: not found; give an existing file or directory")
    if path.is_dir():
        if _is_saved_dataset(path):
            return [path]
        found = []
        for root, dirs, files in os.walk(path):
            saved = [d for d in dirs if _is_saved_dataset(Path(root, d))]
            found += [Path(root, d) for d in saved]
            dirs[:] = sorted(d for d in dirs if d not in saved)  # don't read a saved dataset's own json files
            found += [Path(root, f) for f in files if Path(f).suffix.lower() in SUPPORTED]
        found.sort()
        if not found:
            raise UserError(f"--input {path}: directory holds no {', '.join(SUPPORTED)} files and is not a "
                            "datasets.save_to_disk directory")
        return found
    if path.suffix.lower() not in SUPPORTED:
        raise UserError(f"--input {path}: unsupported file type {path.suffix or '(none)'}; use one of "
                        f"{', '.join(SUPPORTED)}")
    return [path]


def _rows(path: Path, txt_mode: str) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _datasets_rows(path, None)
    elif suffix in TEXT_SUFFIXES:
        for where, text in _text_documents(path, txt_mode):
            yield where, {"text": text}
    elif suffix in JSONL_SUFFIXES or (suffix == ".json" and _starts_with_object(path)):
        yield from _jsonl_rows(path)
    else:
        yield from _datasets_rows(path, DATASETS_SUFFIXES[suffix])


def _starts_with_object(path: Path) -> bool:
    """A .json file that starts with '{' is JSON lines; one that starts with '[' is a JSON array."""
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{"


def _input_files(inputs: list[str]) -> Iterator[Path]:
    for name in inputs:
        for path in _files(Path(name).expanduser()):
            if path.is_file() and path.stat().st_size == 0:
                raise UserError(f"{path}: file is empty; remove it from --input or fill it")
            yield path


def raw_rows(inputs: list[str], txt_mode: str = "auto") -> Iterator[tuple[str, Any]]:
    """(where, row) of every input as read, before any kind check (for tools with their own fields)."""
    for path in _input_files(inputs):
        yield from _rows(path, txt_mode)


def read_records(inputs: list[str], txt_mode: str = "auto") -> Iterator[Record]:
    """Every record of every input, in order, as canonical `Record`s."""
    for path in _input_files(inputs):
        kind, count = None, 0
        for where, row in _rows(path, txt_mode):
            kind = kind or row_kind(row, where)
            count += 1
            yield Record(kind, canonical(kind, row, where), where)
        if count == 0:
            raise UserError(f"{path}: holds no records (only blank lines); remove it from --input")

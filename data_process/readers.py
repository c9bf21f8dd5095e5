"""Reading user files, one record at a time, with errors that name the file, the line and the fix.

Accepted: .txt (a document per line, or documents separated by blank lines), .jsonl/.json, .csv/.tsv,
.parquet, wikiextractor output (extension-less files such as AA/wiki_00, JSON lines or <doc> text), a
directory written by `datasets.save_to_disk`, or a directory holding any of these. JSON lines, CSV/TSV and
<doc> text are parsed here (exact line numbers in errors; CSV/TSV in UTF-8 or the encoding guessed from the
file's start, e.g. GB18030); JSON arrays and Parquet stream through `datasets`.

Which fields feed which dataset is data_process/columns.py's job: the --columns mapping of an input, or
else the preset that a file's first row selects (alpaca, sharegpt, webtext2019zh, ...).
"""

from __future__ import annotations

import codecs
import csv
import html
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_process.columns import Spec, detect, input_specs, is_spec_file
from utils.errors import UserError

log = logging.getLogger(__name__)

# format of a file by its suffix; extension-less files are sniffed (wikiextractor writes AA/wiki_00)
SUFFIX_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                  ".parquet": "parquet"}
SUPPORTED_HELP = f"{', '.join(SUFFIX_FORMATS)}, extension-less wikiextractor files"
CSV_DELIMITERS = {"csv": ",", "tsv": "\t"}
ENCODING_GUESSES = ("utf-16", "gb18030", "big5", "shift_jis", "cp1252")
SAMPLE_BYTES = 1 << 16
DOC_START = re.compile(r"<doc\s([^>]*)>\s*$")
DOC_ATTR = re.compile(r'(\w+)="([^"]*)"')


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
    import datasets  # datasets (~1.5 s to import) only for JSON arrays, CSV, Parquet and saved dirs

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


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _csv_encoding(path: Path) -> str:
    """UTF-8 when the file's first 64 KB decode as UTF-8, else the encoding guess_encoding finds there."""
    with open(path, "rb") as f:
        sample = f.read(SAMPLE_BYTES)
    try:  # incremental: a character cut at the end of the sample is not an error
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError as err:
        enc = guess_encoding(sample)
        if enc == "unknown":
            raise UserError(f"{path}: not UTF-8 (byte 0x{sample[err.start]:02x}) nor any of "
                            f"{', '.join(ENCODING_GUESSES)}; convert it to UTF-8, e.g. `iconv -f ENCODING -t "
                            f"UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`") from None
        log.info("%s: not UTF-8, read as %s", path, enc)
        return enc
    return "utf-8-sig"


def _csv_rows(path: Path, fmt: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of a CSV/TSV file with a header line, streamed, as {column: text} (empty cells are '')."""
    enc, what = _csv_encoding(path), fmt.upper()
    csv.field_size_limit(1 << 30)  # the default 128 K characters is less than a long article
    with open(path, encoding=enc, newline="") as f:
        reader = csv.reader(f, delimiter=CSV_DELIMITERS[fmt])
        try:
            header = [name.strip() for name in next(reader, [])]
            named = [name for name in header if name]
            if len(set(named)) < len(named):
                twice = sorted({name for name in named if named.count(name) > 1})
                raise UserError(f"{path}:1: column {', '.join(twice)} appears twice in the header; rename one")
            end = reader.line_num
            for values in reader:
                start, end = end + 1, reader.line_num
                if not values:  # a blank line
                    continue
                if len(values) != len(header):
                    raise UserError(f"{path}:{start}: cannot be read as {what} ({len(values)} fields, the header "
                                    f"has {len(header)}); check the quoting of that row, or convert the file to "
                                    "JSON lines")
                yield f"{path}:{start}", dict(zip(header, values, strict=True))
        except csv.Error as err:
            raise UserError(f"{path}:{reader.line_num}: cannot be read as {what} ({err}); check the quoting "
                            "of that row, or convert the file to JSON lines") from None
        except UnicodeDecodeError as err:
            guess, shown = guess_encoding(err.object[err.start:]), "UTF-8" if enc == "utf-8-sig" else enc
            raise UserError(f"{path}: near line {reader.line_num + 1}: not {shown} (byte 0x{err.object[err.start]:02x},"
                            f" though the file's start is); it looks like {guess}: convert it, e.g. `iconv -f "
                            f"{guess} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`") from None


def _doc_text(lines: list[str], title: str) -> str:
    """A <doc>'s body without the title line wikiextractor repeats first (its JSON text has none) and
    without blank lines at either end."""
    first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    if first < len(lines) and lines[first].strip() == title.strip():
        first += 1
    return "\n".join(lines[first:]).strip("\n")


def _wiki_doc_rows(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """{id, url, title, text} of each `<doc id=.. url=.. title=..>...</doc>` of wikiextractor's text output."""
    attrs: dict[str, str] | None = None
    body: list[str] = []
    start = 0
    for number, line in _decoded_lines(path):
        if attrs is None:
            match = DOC_START.match(line.strip())
            if match:
                attrs = {k: html.unescape(v) for k, v in DOC_ATTR.findall(match.group(1))}
                body, start = [], number
            elif line.strip():
                raise UserError(f"{path}:{number}: text outside <doc ...>...</doc>; a wikiextractor text file "
                                "holds only <doc> blocks (or use its --json output)")
        elif line.strip() == "</doc>":
            yield f"{path}:{start}", {**attrs, "text": _doc_text(body, attrs.get("title", ""))}
            attrs = None
        else:
            body.append(line)
    if attrs is not None:
        raise UserError(f"{path}:{start}: <doc> is not closed by </doc>; the file was cut short: extract it "
                        "again, or delete the unfinished document")


def _format(path: Path) -> str | None:
    """How to read a file: by its suffix, or for an extension-less file by its start (JSON lines or <doc>,
    as wikiextractor writes them); None when it is not a data file this reader knows."""
    if path.suffix:
        return SUFFIX_FORMATS.get(path.suffix.lower())
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"{"):
        return "jsonl"
    if head.startswith(b"<doc"):
        return "wikidoc"
    return None


def _files(path: Path, skip: frozenset[Path]) -> list[Path]:
    """The input files under one --input path (a directory is searched recursively, sorted; `skip`: spec
    files of --columns, which are not data)."""
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
            found += [p for p in (Path(root, f) for f in files) if not (skip and p.resolve() in skip) and _format(p)]
        found.sort()
        if not found:
            raise UserError(f"--input {path}: directory holds no data files ({SUPPORTED_HELP}) and is not a "
                            "datasets.save_to_disk directory")
        return found
    if path.stat().st_size and _format(path) is None:
        kind = f"file type {path.suffix}" if path.suffix else "extension-less file (not JSON lines or <doc> text)"
        raise UserError(f"--input {path}: unsupported {kind}; use one of {SUPPORTED_HELP}")
    return [path]


def _rows(path: Path, fmt: str | None, txt_mode: str) -> Iterator[tuple[str, Any]]:
    if fmt is None:
        yield from _datasets_rows(path, None)
    elif fmt == "txt":
        for where, text in _text_documents(path, txt_mode):
            yield where, {"text": text}
    elif fmt == "jsonl" or (fmt == "json" and _starts_with_object(path)):
        yield from _jsonl_rows(path)
    elif fmt in CSV_DELIMITERS:
        yield from _csv_rows(path, fmt)
    elif fmt == "wikidoc":
        yield from _wiki_doc_rows(path)
    else:
        yield from _datasets_rows(path, fmt)


def _starts_with_object(path: Path) -> bool:
    """A .json file that starts with '{' is JSON lines; one that starts with '[' is a JSON array."""
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{"


def _input_files(inputs: list[str], skip: frozenset[Path] = frozenset()) -> Iterator[tuple[Path, str | None]]:
    """(file, format) of every input; format None is a save_to_disk directory."""
    for name in inputs:
        for path in _files(Path(name).expanduser(), skip):
            if path.is_dir():
                yield path, None
            elif path.stat().st_size == 0:
                raise UserError(f"{path}: file is empty; remove it from --input or fill it")
            else:
                yield path, _format(path)


def raw_rows(inputs: list[str], txt_mode: str = "auto") -> Iterator[tuple[str, Any]]:
    """(where, row) of every input as read, before any mapping (for tools with their own fields)."""
    for path, fmt in _input_files(inputs):
        yield from _rows(path, fmt, txt_mode)


def read_records(inputs: list[str], txt_mode: str = "auto", columns: Sequence[str] = ()) -> Iterator[Record]:
    """Every record of every input, in order, as canonical `Record`s: each input's rows go through its
    --columns mapping (`columns`: one entry for all inputs or one per input), or else through the preset
    its first row selects. A .txt file is text whatever the mapping: it has no fields."""
    skip = frozenset(Path(c.strip()).expanduser().resolve() for c in columns if is_spec_file(c))
    for name, mapping in zip(inputs, input_specs(inputs, list(columns)), strict=True):
        for path, fmt in _input_files([name], skip):
            spec: Spec | None = None if fmt == "txt" else mapping
            count = 0
            for where, row in _rows(path, fmt, txt_mode):
                if spec is None:
                    spec = detect(row, where)
                if count == 0:
                    log.info("%s: %s -> %s", path, spec.name, spec.kind)
                count += 1
                yield Record(spec.kind, spec.apply(row, where), where)
            if count == 0:
                raise UserError(f"{path}: holds no records (only blank lines or a header); remove it from --input")

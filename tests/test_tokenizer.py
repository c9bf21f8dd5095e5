"""step0_tokenizer: the HF tokenizer equals SentencePiece id for id on normalised text, applies the toolkit's
normalisation to raw text itself, round-trips every line of the demo corpus, has a piece for the Chinese
punctuation users type, renders ChatML, and the packed token files hold exactly the pretraining text."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from data_process.demo import SOURCES, Reserved, source_text
from data_process.main import DEFAULT_RESERVED
from data_process.main import main as data_main
from step0_tokenizer.main import main as step0_main
from step0_tokenizer.pack import token_dtype
from step0_tokenizer.spm import SPECIAL_TOKENS, within_budget
from utils.text import CJK_PUNCTUATION, fold_characters

VOCAB = 512
EDGE_CASES = ["😀👍🏽 emoji", "𠀀𪚥 rare CJK", "a  b\t\tc  ", "\n\nline\n", "  leading", "trailing  ",
              "１２３４５ full width", "1234567890", "<|im_start|>user\n你好<|im_end|>\n", "<|endoftext|><|pad|>",
              "e\u0301 combining", "\u200b zero width", "x" * 3000]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A small demo slice and a 512-token tokenizer trained on it (a few seconds)."""
    root = tmp_path_factory.mktemp("step0")
    data_main(["--output_dir", str(root / "data"), "--demo_scale", "0.05"])
    step0_main(["--data_path", str(root / "data"), "--output_dir", str(root / "step0"), "--vocab_size", str(VOCAB),
                "--num_proc", "2", "--num_threads", "2"])
    return root


@pytest.fixture(scope="module")
def tok(built):
    return AutoTokenizer.from_pretrained(str(built / "step0" / "tokenizer"))


@pytest.fixture(scope="module")
def sp(built):
    return spm.SentencePieceProcessor(model_file=str(built / "step0" / "tokenizer" / "spm.model"))


def demo_corpus() -> list[str]:
    """Every line of the demo source files (reserved lines excluded), raw, as the package ships them."""
    reserved = Reserved.load(str(DEFAULT_RESERVED))
    lines = []
    for rel in SOURCES.values():
        banned = reserved.lines.get(rel, set())
        lines += [line for n, line in enumerate(source_text(rel).split("\n"), 1) if line and n not in banned]
    return lines


def test_fast_tokenizer_and_special_tokens(tok, sp):
    assert tok.is_fast and len(tok) == VOCAB == sp.get_piece_size()
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    for piece in SPECIAL_TOKENS:
        ids = tok.encode(piece)
        assert ids == [tok.convert_tokens_to_ids(piece)] == sp.encode(piece) == [sp.piece_to_id(piece)]
    assert tok.eos_token_id == sp.piece_to_id("<|endoftext|>") and tok.pad_token_id != tok.eos_token_id
    assert tok("你好")["input_ids"] == sp.encode("你好")  # no BOS/EOS added


def test_hf_equals_sentencepiece_and_round_trips_the_whole_demo_corpus(tok, sp, built):
    """Raw text through the HF tokenizer == its normalised form through SentencePiece (trained on normalised
    text, with no normaliser of its own), and decoding gives the normalised text back."""
    corpus = demo_corpus() + EDGE_CASES
    pretrain = datasets.load_from_disk(str(built / "data" / "pretrain"))
    corpus += list(pretrain["train"]["text"]) + list(pretrain["validation"]["text"])
    assert len(corpus) > 50_000
    folded = [fold_characters(c) for c in corpus]
    hf_ids = [e.ids for e in tok.backend_tokenizer.encode_batch(corpus, add_special_tokens=False)]
    sp_ids = sp.encode(folded)
    mismatches = [c for c, a, b in zip(corpus, hf_ids, sp_ids, strict=True) if a != b]
    assert not mismatches, mismatches[:3]
    decoded = tok.backend_tokenizer.decode_batch(hf_ids, skip_special_tokens=False)
    broken = [c for c, d in zip(folded, decoded, strict=True) if c != d]
    assert not broken, broken[:3]
    assert tok.unk_token_id not in {i for ids in hf_ids for i in ids}  # byte fallback: nothing is unknown
    assert [tok.decode(tok.encode(x)) for x in EDGE_CASES] == [fold_characters(x) for x in EDGE_CASES]
    assert tok.decode(tok.encode("１２３４５ full width")) == "12345 full width"


# prompts as Chinese users type them: full-width marks, half-width marks after Chinese, and both mixed
USER_PROMPTS = ["你好！", "这家酒店怎么样？", "这家酒店怎么样?", "评论：房间很干净，服务也好！", "评论:房间很干净,服务也好!",
                "请对下面的句子进行分词：我爱北京天安门。", "他说：“今天天气不错。”", "（附图）", "真的吗？？", "好吧……",
                "优点:屏幕大;缺点：电池不行", "价格３０００元，还行"]


def test_user_typed_punctuation_has_pieces_and_both_widths_meet(tok, built):
    """Every common Chinese mark of the training text is one piece (no byte fallback), user prompts have no
    byte pieces, and half-width marks typed after Chinese text give the same ids as the full-width ones."""
    byte_ids = {i for i in range(len(tok)) if tok.convert_ids_to_tokens(i).startswith("<0x")}
    seen = set("".join(datasets.load_from_disk(str(built / "data" / "pretrain"))["train"]["text"]))
    assert set("，。！？：；、“”（）《》") <= seen  # the demo slice has them, in Chinese form
    for mark in (m for m in CJK_PUNCTUATION if m in seen):
        ids = tok.encode(mark)
        assert not byte_ids & set(ids), (mark, tok.convert_ids_to_tokens(ids))
    for prompt in USER_PROMPTS:  # this 512-token vocab lacks many characters, but no mark goes to bytes
        enc = tok(prompt, return_offsets_mapping=True)
        spans = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        as_bytes = "".join(prompt[a:b] for i, (a, b) in spans if i in byte_ids)
        assert not set(as_bytes) & set(CJK_PUNCTUATION + ",!?:;"), (prompt, enc["input_ids"])
    assert tok.encode("这家酒店怎么样?") == tok.encode("这家酒店怎么样？")
    assert tok.encode("评论:房间很干净,服务也好!") == tok.encode("评论：房间很干净，服务也好！")
    assert tok.decode(tok.encode("Hello, world! 10:30")) == "Hello, world! 10:30"  # English stays ASCII


def test_chat_template_is_chatml(tok):
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好!有什么可以帮你?"}]
    rendered = ("<|im_start|>system\n你是助手。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                "<|im_start|>assistant\n你好!有什么可以帮你?<|im_end|>\n")
    assert tok.apply_chat_template(messages, tokenize=False) == rendered
    assert tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\n你是助手。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == tok.encode(rendered)
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 3


def test_packed_tokens_hold_the_pretrain_text(tok, built):
    tokens = built / "step0" / "tokens"
    meta = json.loads((tokens / "meta.json").read_text())
    pretrain = datasets.load_from_disk(str(built / "data" / "pretrain"))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB
    assert meta["eos_token_id"] == tok.eos_token_id
    for split in ("train", "validation"):
        arr = np.memmap(tokens / f"{split}.bin", dtype=np.uint16, mode="r")
        texts = list(pretrain[split]["text"])
        assert len(arr) == meta["num_tokens"][split]
        assert meta["num_chars"][split] == sum(len(t) for t in texts)
        eos = np.flatnonzero(arr == meta["eos_token_id"])
        assert len(eos) == len(texts) and eos[-1] == len(arr) - 1  # one EOS after every document
        docs = np.split(np.asarray(arr), eos + 1)[:-1]
        assert [tok.decode(d[:-1].tolist()) for d in docs] == texts


def test_stats(built):
    stats = json.loads((built / "step0" / "stats.json").read_text())
    assert stats["vocab_size"] == VOCAB
    assert 0.3 < stats["chars_per_token"]["train"] < 3
    assert 0 < stats["character_coverage"]["validation"] <= 1
    assert 0 < stats["byte_fallback_token_share"]["train"] < 1
    config = json.loads((built / "step0" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB


def test_token_dtype():
    assert token_dtype(8000) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_rare_characters_are_cut_out_of_training_lines():
    lines = ["常常常用用字罕", "罕", "常用字"]
    counts = Counter("".join(lines))  # 常 4, 用 3, 字 2, 罕 1 (set below)
    counts["罕"] = 1
    assert list(within_budget(lines, counts, 3)) == ["常常常用用字", "常用字"]
    assert list(within_budget(lines, counts, 10)) == lines


def test_step0_bad_inputs(tmp_path, capsys, built):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--data_path", tmp_path / "nothere"], "no pretrain dataset"),
        (["--data_path", tmp_path / "empty"], "run data_process/main.py first"),
        (["--data_path", built / "data", "--vocab_size", "100"], "--vocab_size=100"),
        (["--data_path", built / "data", "--character_coverage", "0.5"], "--character_coverage=0.5"),
    ]
    for argv, part in cases:
        out = tmp_path / "out" / "step0"
        with pytest.raises(SystemExit) as exc:
            step0_main([str(a) for a in ["--output_dir", out, *argv]])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2 and err.startswith("error: ") and part in err, err
        assert not out.exists()


def test_character_level_vocabulary(built, tmp_path):
    """--max_piece_length 1: no merges, every covered character one token, the HF twin still equal to
    SentencePiece, and a word-segmented copy of a sentence reuses the sentence's own tokens."""
    step0_main(["--data_path", str(built / "data"), "--output_dir", str(tmp_path / "char"), "--vocab_size", "2000",
                "--max_piece_length", "1", "--num_proc", "1", "--num_threads", "2"])
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "char" / "tokenizer"))
    sp_char = spm.SentencePieceProcessor(model_file=str(tmp_path / "char" / "tokenizer" / "spm.model"))
    text = "中国人民今天发表讲话"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == sp_char.encode(text) and len(ids) == len(text)
    spaced = tok("中国 人民", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(spaced) == ["中", "国", "▁", "人", "民"]  # the same tokens plus a space
    assert all(len(p.lstrip("▁")) <= 1 for p in tok.convert_ids_to_tokens(list(range(5, len(tok))))
               if not p.startswith("<"))

"""data_process readers: the public Chinese corpora in their published schemas (one small file each, written
here) -> the right dataset kind and canonical rows; CSV/TSV encodings; wikiextractor's extension-less files;
case-insensitive fields; --columns mappings and spec files; ambiguous or unknown rows -> one error line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from data_process.main import main
from data_process.readers import read_records
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def table(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8",
          delimiter: str = ",") -> Path:
    with open(path, "w", encoding=encoding, newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read(*inputs: Path, columns: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """(kind, canonical row) of every record of the inputs."""
    return [(r.kind, r.data) for r in read_records([str(p) for p in inputs], "auto", columns)]


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# ---------------------------------------------------------------------------------------------------------
# presets, one per published schema


def test_alpaca_with_input_system_and_history(tmp_path):
    src = jsonl(tmp_path / "alpaca_zh.jsonl", [
        {"instruction": "把这句话翻译成英文", "input": "今天天气很好", "output": "The weather is nice today."},
        {"instruction": "写一首关于春天的诗", "input": "", "output": "春风拂面百花开", "system": "你是一位诗人",
         "history": [["你好", "你好！有什么可以帮你？"]]},
    ])
    assert read(src) == [
        ("sft", chat(("user", "把这句话翻译成英文\n今天天气很好"), ("assistant", "The weather is nice today."))),
        ("sft", chat(("system", "你是一位诗人"), ("user", "你好"), ("assistant", "你好！有什么可以帮你？"),
                     ("user", "写一首关于春天的诗"), ("assistant", "春风拂面百花开"))),
    ]


def test_sharegpt_roles_and_keys(tmp_path):
    src = jsonl(tmp_path / "sharegpt.jsonl", [
        {"id": "a1", "conversations": [{"from": "system", "value": "你是助手"}, {"from": "human", "value": "北京在哪里？"},
                                       {"from": "gpt", "value": "北京在中国北方。"}, {"from": "human", "value": "有多少人？"},
                                       {"from": "gpt", "value": "大约两千万人。"}]},
        {"id": "a2", "conversations": [{"from": "user", "value": "你好"}, {"from": "assistant", "value": "你好呀"}]},
    ])
    assert read(src) == [
        ("sft", chat(("system", "你是助手"), ("user", "北京在哪里？"), ("assistant", "北京在中国北方。"),
                     ("user", "有多少人？"), ("assistant", "大约两千万人。"))),
        ("sft", chat(("user", "你好"), ("assistant", "你好呀"))),
    ]


def test_openai_messages(tmp_path):
    row = chat(("system", "简洁回答"), ("user", "一加一等于几？"), ("assistant", "二"))
    assert read(jsonl(tmp_path / "m.jsonl", [row])) == [("sft", row)]


def test_preference_conversational_explicit_prompt_keeps_the_last_user_turn(tmp_path):
    src = jsonl(tmp_path / "pref.jsonl", [{
        "prompt": [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "推荐一本书"},
                   {"role": "assistant", "content": "《红楼梦》"}, {"role": "user", "content": "为什么推荐它？"}],
        "chosen": [{"role": "assistant", "content": "它写尽了一个家族的兴衰。"}],
        "rejected": [{"role": "assistant", "content": "不知道。"}]}])
    assert read(src) == [("preference", {"prompt": "为什么推荐它？", "chosen": "它写尽了一个家族的兴衰。",
                                         "rejected": "不知道。"})]


def test_preference_conversational_implicit_prompt_is_the_shared_opening(tmp_path):
    opening = [{"role": "user", "content": "天空是什么颜色？"}]
    src = jsonl(tmp_path / "pref.jsonl", [
        {"chosen": [*opening, {"role": "assistant", "content": "晴天时是蓝色的。"}],
         "rejected": [*opening, {"role": "assistant", "content": "绿色。"}]}])
    assert read(src) == [("preference", {"prompt": "天空是什么颜色？", "chosen": "晴天时是蓝色的。", "rejected": "绿色。"})]
    # plain-text pairs with no prompt: one error naming the fields and the flag
    bad = jsonl(tmp_path / "bad.jsonl", [{"chosen": "好", "rejected": "坏"}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: .*no prompt field \(found: chosen, rejected\).*--columns"):
        read(bad)


def test_prompt_only_conversational(tmp_path):
    src = jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "讲个笑话"}]}, {"prompt": "写首诗"}])
    assert read(src) == [("prompts", {"prompt": "讲个笑话"}), ("prompts", {"prompt": "写首诗"})]


def test_webtext2019zh(tmp_path):
    src = jsonl(tmp_path / "web_text_zh_valid.json", [
        {"qid": 65618973, "title": "AlphaGo只会下围棋吗？", "desc": "它能不能做别的事？", "topic": "机器学习", "star": 3,
         "content": "当然不是，它的方法可以用于很多领域。", "answer_id": 545576062, "answerer_tags": "人工智能研究者"},
        {"qid": 65618974, "title": "如何学好数学？", "desc": "", "topic": "数学", "star": 1,
         "content": "多做题，多思考。", "answer_id": 545576063, "answerer_tags": ""},
    ])
    assert read(src) == [
        ("sft", chat(("user", "AlphaGo只会下围棋吗？\n它能不能做别的事？"), ("assistant", "当然不是，它的方法可以用于很多领域。"))),
        ("sft", chat(("user", "如何学好数学？"), ("assistant", "多做题，多思考。"))),
    ]


def test_baike_qa2019(tmp_path):
    src = jsonl(tmp_path / "baike_qa_valid.json", [
        {"qid": "qid_2540946131115409959", "category": "生活-美食/烹饪", "title": "怎么做红烧肉？",
         "desc": "要肥而不腻的", "answer": "先焯水，再炒糖色，小火慢炖一小时。"}])
    assert read(src) == [("sft", chat(("user", "怎么做红烧肉？\n要肥而不腻的"), ("assistant", "先焯水，再炒糖色，小火慢炖一小时。")))]


def test_zhihu_kol_parquet_with_upper_case_fields(tmp_path):
    src = tmp_path / "zhihu_kol.parquet"
    datasets.Dataset.from_list([{"INSTRUCTION": "为什么天空是蓝色的？", "RESPONSE": "因为瑞利散射。",
                                 "SOURCE": "Zhihu", "METADATA": json.dumps({"question_id": 1})}]).to_parquet(str(src))
    assert read(src) == [("sft", chat(("user", "为什么天空是蓝色的？"), ("assistant", "因为瑞利散射。")))]


def test_fields_match_case_insensitively(tmp_path):
    src = jsonl(tmp_path / "mixed.jsonl", [{"Instruction": "解释成语", "INPUT": "画蛇添足", "Output": "做多余的事反而坏事。"},
                                           {"instruction": "解释成语", "output": "比喻多此一举。"}])
    assert read(src) == [("sft", chat(("user", "解释成语\n画蛇添足"), ("assistant", "做多余的事反而坏事。"))),
                         ("sft", chat(("user", "解释成语"), ("assistant", "比喻多此一举。")))]
    roles = jsonl(tmp_path / "roles.jsonl", [{"Conversations": [{"From": "Human", "Value": "你好"},
                                                                {"FROM": "GPT", "VALUE": "你好！"}]}])
    assert read(roles) == [("sft", chat(("user", "你好"), ("assistant", "你好！")))]
    clash = jsonl(tmp_path / "clash.jsonl", [{"Text": "一", "text": "二"}])
    with pytest.raises(UserError, match="'Text' and 'text' differ only in case"):
        read(clash)


def test_wikiextractor_json_dir_without_extensions(tmp_path):
    wiki = tmp_path / "wiki"
    articles = [{"id": "13", "revid": "1", "url": "https://zh.wikipedia.org/wiki?curid=13", "title": "数学",
                 "text": "数学是研究数量、结构以及空间等概念的一门学科。"},
                {"id": "18", "revid": "2", "url": "https://zh.wikipedia.org/wiki?curid=18", "title": "哲学",
                 "text": "哲学是研究普遍的、基础问题的学科。\n它包括存在、知识、价值等问题。"},
                {"id": "24", "revid": "3", "url": "https://zh.wikipedia.org/wiki?curid=24", "title": "物理学",
                 "text": "物理学是研究物质、能量的科学。"}]
    jsonl(wiki / "AA" / "wiki_00", articles[:2])
    jsonl(wiki / "AB" / "wiki_00", articles[2:])
    (wiki / "AA" / "NOTES").write_text("not a data file\n", encoding="utf-8")  # extension-less, not data: skipped
    expected = [("pretrain", {"text": a["text"]}) for a in articles]
    assert read(wiki) == expected
    assert read(wiki / "AB" / "wiki_00") == expected[2:]  # given directly
    with pytest.raises(UserError, match="unsupported extension-less file"):
        read(wiki / "AA" / "NOTES")


def test_wikiextractor_doc_text_form(tmp_path):
    src = tmp_path / "AA" / "wiki_01"
    src.parent.mkdir()
    src.write_text('<doc id="13" url="https://zh.wikipedia.org/wiki?curid=13" title="数学">\n数学\n\n'
                   "数学是研究数量、结构以及空间的学科。\n\n它的基础是逻辑。\n</doc>\n"
                   '<doc id="18" url="https://zh.wikipedia.org/wiki?curid=18" title="&quot;哲学&quot;">\n"哲学"\n\n'
                   "哲学研究基础问题。\n</doc>\n", encoding="utf-8")
    assert read(tmp_path) == [("pretrain", {"text": "数学是研究数量、结构以及空间的学科。\n\n它的基础是逻辑。"}),
                              ("pretrain", {"text": "哲学研究基础问题。"})]
    src.write_text('<doc id="13" url="u" title="数学">\n数学\n\n正文被截断', encoding="utf-8")
    with pytest.raises(UserError, match=r"wiki_01:1: <doc> is not closed"):
        read(src)


# ---------------------------------------------------------------------------------------------------------
# CSV / TSV and encodings


MEDICAL = [["心血管科", "高血压患者能吃党参吗？", "我有高血压，这两天女婿给我拿了些党参泡水喝，可以吃吗？",
            "高血压病人可以口服党参，它有降血脂、降血压的作用。"],
           ["儿科", "小孩发烧怎么办", "孩子三岁，发烧三十八度五，要去医院吗？", "先物理降温，超过三十九度或精神差请就医。"]]


def test_medical_dialogue_csv_in_gb18030(tmp_path):
    src = table(tmp_path / "内科5000-33000.csv", ["department", "title", "ask", "answer"], MEDICAL, "gb18030")
    assert src.read_bytes().decode("gb18030") and not _is_utf8(src.read_bytes())
    assert read(src) == [("sft", chat(("user", ask), ("assistant", answer))) for _, _, ask, answer in MEDICAL]


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_tsv_with_quoted_newlines_and_empty_cells(tmp_path):
    src = table(tmp_path / "qa.tsv", ["Prompt", "Response", "System"],
                [["第一行\n第二行", "回答，带逗号", ""], ["问题二", "回答二", "你是客服"]], delimiter="\t")
    assert read(src) == [("sft", chat(("user", "第一行\n第二行"), ("assistant", "回答，带逗号"))),
                         ("sft", chat(("system", "你是客服"), ("user", "问题二"), ("assistant", "回答二")))]


def test_csv_that_stops_decoding_names_the_guessed_encoding(tmp_path):
    src = tmp_path / "big.csv"
    good = "".join(f"第{i}篇文章的内容在这里\n" for i in range(4000))  # > 64 KB of UTF-8
    src.write_bytes(b"text\n" + good.encode() + "这一行是国标编码\n".encode("gb18030"))
    with pytest.raises(UserError) as err:
        read(src)
    message = str(err.value)
    assert "big.csv: near line" in message and "not UTF-8" in message and "gb18030" in message and "iconv" in message
    assert "\n" not in message


def test_csv_rows_with_the_wrong_number_of_fields(tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("prompt,response\n问题一,回答一\n问题二,回答二,多余\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"x.csv:3: cannot be read as CSV \(3 fields, the header has 2\)"):
        read(src)


# ---------------------------------------------------------------------------------------------------------
# --columns and spec files


def test_columns_inline_mapping_and_joined_fields(tmp_path):
    src = jsonl(tmp_path / "qa.jsonl", [{"question": "什么是光合作用？", "detail": "简单说", "answer": "植物利用阳光制造养分。"},
                                        {"question": "水的化学式？", "answer": "H2O"}])
    assert read(src, columns=("prompt=question+detail,response=answer",)) == [
        ("sft", chat(("user", "什么是光合作用？\n简单说"), ("assistant", "植物利用阳光制造养分。"))),
        ("sft", chat(("user", "水的化学式？"), ("assistant", "H2O")))]
    # the same fields as pretraining text; and a missing field names what the row has
    assert read(src, columns=("text=answer",)) == [("pretrain", {"text": "植物利用阳光制造养分。"}),
                                                   ("pretrain", {"text": "H2O"})]
    with pytest.raises(UserError, match=r"qa.jsonl:1: missing field 'reply' \(found: answer, detail, question\)"):
        read(src, columns=("prompt=question,response=reply",))


def test_columns_one_per_input_and_txt_keeps_its_text(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"q": "问一", "a": "答一"}])
    b = jsonl(tmp_path / "b.jsonl", [{"text": "一篇文档"}])
    txt = tmp_path / "c.txt"
    txt.write_text("纯文本文档\n", encoding="utf-8")
    assert read(a, b, txt, columns=("prompt=q,response=a", "auto", "prompt=q,response=a")) == [
        ("sft", chat(("user", "问一"), ("assistant", "答一"))), ("pretrain", {"text": "一篇文档"}),
        ("pretrain", {"text": "纯文本文档"})]
    with pytest.raises(UserError, match="--columns has 2 entries for 3 --input paths"):
        read(a, b, txt, columns=("auto", "auto"))


def test_spec_file_with_roles_and_keys(tmp_path):
    src = tmp_path / "data"
    jsonl(src / "dialog.jsonl", [{"对话": [{"speaker": "病人", "utterance": "我头疼"}, {"speaker": "医生", "utterance": "多休息"}],
                                  "科室": "神经科"}])
    spec = src / "spec.yaml"  # inside the input dir: not read as data
    spec.write_text("messages: 对话\nrole_key: speaker\ncontent_key: utterance\nuser_role: [病人, 患者]\n"
                    "assistant_role: 医生\n", encoding="utf-8")
    assert read(src, columns=(str(spec),)) == [("sft", chat(("user", "我头疼"), ("assistant", "多休息")))]
    spec_json = src / "spec.json"  # a .json spec in the input dir is skipped too (else: no known fields)
    spec_json.write_text(json.dumps({"Messages": "对话", "role_key": "speaker", "content_key": "utterance",
                                     "user_role": "病人", "assistant_role": ["医生"]}), encoding="utf-8")
    assert read(src, columns=(str(spec_json),)) == [("sft", chat(("user", "我头疼"), ("assistant", "多休息")))]
    spec_json.write_text(json.dumps({"prompt": ["对话"], "chosen": "a"}), encoding="utf-8")
    with pytest.raises(UserError, match="slots chosen, prompt do not make a dataset row"):
        read(src, columns=(str(spec_json),))
    with pytest.raises(UserError, match=r"dialog.jsonl:1: 对话\[0\].speaker='病人' is not a known role .*"
                                        "--columns user_role=病人 or assistant_role=病人"):
        read(src / "dialog.jsonl", columns=("messages=对话,role_key=speaker,content_key=utterance",))


@pytest.mark.parametrize("entry, message", [
    ("prompt=question,answer", "'answer' is not slot=field"),
    ("prompt=q,reply=a", "unknown slot 'reply'"),
    ("text=a,prompt=b", "slots prompt, text do not make a dataset row"),
    ("missing.yaml", "spec file not found"),
])
def test_bad_columns_fail_before_any_work(entry, message, tmp_path, capsys):
    src = jsonl(tmp_path / "x.jsonl", [{"text": "一篇文档"}])
    with pytest.raises(SystemExit) as exc:
        main(["--output_dir", str(tmp_path / "out"), "--input", str(src), "--columns", entry])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# through the command line: unknown and ambiguous rows are one error line; a mapping resolves them


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "data_process/main.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_ambiguous_and_unknown_rows_are_one_error_line_then_columns_resolve_them(tmp_path):
    src = jsonl(tmp_path / "alpaca_text.jsonl", [{"instruction": "问候一下", "input": "", "output": "你好呀朋友",
                                                  "text": "下面是一条指令。问候一下。你好呀朋友"}] * 3)
    r = run_cli("--input", str(src), "--output_dir", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    line = r.stderr.strip()
    for part in ("alpaca_text.jsonl:1", "found: input, instruction, output, text", "alpaca -> sft",
                 "text -> pretrain", "--columns"):
        assert part in line, (part, line)
    assert not (tmp_path / "out").exists()

    unknown = jsonl(tmp_path / "u.jsonl", [{"问题": "一", "回答": "二"}])
    r = run_cli("--input", str(unknown), "--output_dir", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "u.jsonl:1: no known fields (found: 回答, 问题)" in r.stderr and "--columns" in r.stderr

    out = tmp_path / "out"
    main(["--output_dir", str(out), "--input", str(src), str(unknown), "--columns", "prompt=instruction,"
          "response=output", "prompt=问题,response=回答", "--eval_ratio", "0", "--data_split", "1,0,0",
          "--min_chars", "1", "--validation_ratio", "0"])
    sft = datasets.load_from_disk(str(out / "sft"))["train"]
    assert sorted(m[0]["content"] + "|" + m[1]["content"] for m in sft["messages"]) == ["一|二", "问候一下|你好呀朋友"]
    assert json.loads((out / "stats.json").read_text())["pretrain"] == {"train": 0, "validation": 0}


def test_medical_csv_end_to_end(tmp_path):
    src = tmp_path / "Data_数据" / "IM_内科"
    src.mkdir(parents=True)
    table(src / "内科5000-33000.csv", ["department", "title", "ask", "answer"], MEDICAL, "gb18030")
    out = tmp_path / "out"
    main(["--output_dir", str(out), "--input", str(tmp_path / "Data_数据"), "--eval_ratio", "0",
          "--data_split", "1,0,0", "--validation_ratio", "0"])
    sft = datasets.load_from_disk(str(out / "sft"))["train"]
    assert len(sft) == 2 and set(sft["task"]) == {"user"}
    assert {m[0]["content"][:4] + m[1]["content"][:4] for m in sft["messages"]} == {"我有高血高血压病", "孩子三岁先物理降"}

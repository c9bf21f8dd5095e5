"""Model dirs in and out: exports that transformers' own tools use as chat.py does (they stop at the end of
the reply), and damaged model dirs, tokenizer files and --config files that every entry point reports in one
error line (exit 2, the file named, nothing written)."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PAIRS, REPO, clean_env

from step1_pretrain_sft.chat import main as chat_main
from step1_pretrain_sft.main import main as step1_main
from step2_reward_model.main import main as step2_main
from step2_reward_model.rw_eval import main as rw_eval_main
from utils.generation import stop_token_ids

CONVERSATIONS = [
    [{"role": "user", "content": "判断情感：房间干净，服务很好"}, {"role": "assistant", "content": "正面"}],
    [{"role": "user", "content": "判断情感：太吵了，不会再来"}, {"role": "assistant", "content": "负面"}],
    [{"role": "user", "content": "写一条好评"}, {"role": "assistant", "content": "这本书写得很好，值得一读"}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，有什么可以帮你？"}],
]
COMMON = ["--dtype", "fp32", "--enable_tensorboard", "false", "--eval_interval", "0", "--save_interval", "0",
          "--per_device_train_batch_size", "4", "--lr_scheduler_type", "constant", "--max_seq_len", "96"]
MAX_NEW = 40


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# Exports: the configs name the tokenizer's ids, so transformers' pipelines behave as our own code


@pytest.fixture(scope="module")
def exports(dist, chat_tokenizer, tmp_path_factory):
    """An SFT export that answers the 4 conversations exactly, and a reward-model export trained from it."""
    from utils.model import create_causal_lm

    root = tmp_path_factory.mktemp("exports")
    create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).save_pretrained(root / "base")
    chat_tokenizer.save_pretrained(root / "base")
    sft_rows = write_jsonl(root / "sft.jsonl", [{"messages": c} for c in CONVERSATIONS * 4])
    step1_main(["--stage", "sft", "--model_name_or_path", str(root / "base"), "--data_path", str(sft_rows),
                "--output_dir", str(root / "sft"), "--max_steps", "150", "--learning_rate", "1e-2", *COMMON])
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r, _ in PAIRS])
    step2_main(["--model_name_or_path", str(root / "sft" / "final"), "--data_path", str(pairs),
                "--output_dir", str(root / "rm"), "--max_steps", "4", "--learning_rate", "3e-3", *COMMON])
    return root


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_export_configs_name_the_tokenizers_ids(exports, chat_tokenizer, kind):
    """eos is the list of stop ids (the end-of-turn token first), pad the tokenizer's pad, and bos is not
    LlamaConfig's default 1 (<|endoftext|> here) but the tokenizer's bos: none."""
    final = exports / kind / "final"
    want = {"eos_token_id": stop_token_ids(chat_tokenizer), "pad_token_id": chat_tokenizer.pad_token_id,
            "bos_token_id": None}
    assert want["eos_token_id"][0] == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    files = ["config.json"] + (["generation_config.json"] if kind == "sft" else [])
    for name in files:
        config = json.loads((final / name).read_text())
        assert {k: config.get(k) for k in want} == want, name


def test_text_generation_pipeline_stops_where_chat_py_stops(exports, chat_tokenizer, tmp_path):
    """transformers' pipeline("text-generation") on the SFT export, fed the chat messages, ends each reply at
    <|im_end|> and says what chat.py's greedy answer says."""
    from transformers import pipeline

    final = exports / "sft" / "final"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": c[0]["content"]} for c in CONVERSATIONS])
    chat_main(["--model", str(final), "--prompts", str(prompts), "--out", str(tmp_path / "answers.jsonl"),
               "--greedy", "--repetition_penalty", "1", "--max_new_tokens", str(MAX_NEW)])
    answers = [json.loads(line)["response"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answers == [c[-1]["content"] for c in CONVERSATIONS]  # the model learned to answer, then stop
    generate = pipeline("text-generation", model=str(final), device="cpu")
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for conversation, answer in zip(CONVERSATIONS, answers, strict=True):
        out = generate(conversation[:1], max_new_tokens=MAX_NEW)[0]["generated_text"]
        assert out[-1] == {"role": "assistant", "content": answer}
        prompt_len = len(chat_tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True,
                                                            tokenize=True, return_dict=True)["input_ids"])
        ids = generate(conversation[:1], max_new_tokens=MAX_NEW, return_tensors=True)[0]["generated_token_ids"]
        assert ids[-1] == im_end and len(ids) - prompt_len < MAX_NEW


def test_text_classification_pipeline_scores_as_rw_eval(exports, chat_tokenizer, tmp_path):
    """transformers' pipeline("text-classification") on the reward-model export gives rw_eval's scores."""
    from transformers import pipeline

    from utils.chat import render_response

    final = exports / "rm" / "final"
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": p, "response": c} for p, c, _, _ in PAIRS[:4]])
    report = rw_eval_main(["--model", str(final), "--prompts", str(rows)])
    ours = {(r["prompt"], r["response"]): r["reward"] for r in report["scored"]}
    classify = pipeline("text-classification", model=str(final), device="cpu", function_to_apply="none")
    for (prompt, response), reward in ours.items():
        text = chat_tokenizer.decode(render_response(chat_tokenizer, prompt, response))
        assert classify(text)[0]["score"] == pytest.approx(reward, abs=1e-4)


# ----------------------------------------------------------------------------------------------------
# Damaged inputs: one error line naming the file, exit 2, nothing written


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"\x00\xff" * 16 + data[40:])


@pytest.fixture(scope="module")
def bad(chat_tokenizer, tmp_path_factory):
    """Sound nano causal-LM and reward-model dirs, damaged copies (name -> dir) and small data files."""
    from utils.model import create_causal_lm
    from utils.reward import create_reward_model

    root = tmp_path_factory.mktemp("bad_dirs")
    create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).save_pretrained(root / "lm")
    chat_tokenizer.save_pretrained(root / "lm")
    create_reward_model(root / "lm", chat_tokenizer.pad_token_id, seed=1).save_pretrained(root / "rm")
    chat_tokenizer.save_pretrained(root / "rm")
    damages = {"truncated": ("model.safetensors", truncate), "scrambled": ("model.safetensors", scramble_header),
               "bad_config": ("config.json", truncate), "bad_tokenizer": ("tokenizer.json", truncate)}
    for model in ("lm", "rm"):
        for name, (file, damage) in damages.items():
            shutil.copytree(root / model, root / f"{model}_{name}")
            damage(root / f"{model}_{name}" / file)
    shutil.copytree(root / "lm", root / "lm_config_list")
    (root / "lm_config_list" / "config.json").write_text("[1, 2]")
    write_jsonl(root / "sft.jsonl", [{"messages": c} for c in CONVERSATIONS])
    write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r, _ in PAIRS])
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p, *_ in PAIRS])
    write_jsonl(root / "rows.jsonl", [{"prompt": p, "reference": c} for p, c, *_ in PAIRS])
    (root / "eval").mkdir()
    write_jsonl(root / "eval" / "t1_sentiment.jsonl", [{"prompt": "好", "reference": "正面"}])
    (root / "bad.yaml").write_text("learning_rate: 0.01\nzero_stage: [1\nseed: 3\n")
    (root / "list.yaml").write_text("- learning_rate: 0.01\n- seed: 3\n")
    return root


def cases(root: Path, out: Path) -> dict[str, tuple[list[str], Path, str]]:
    """name -> (command, the file the error line must name, a phrase it must hold)."""
    lm, rm = str(root / "lm"), str(root / "rm")
    sft = ["step1_pretrain_sft/main.py", "--stage", "sft", "--data_path", str(root / "sft.jsonl"),
           "--output_dir", str(out)]
    pairs = ["--data_path", str(root / "pairs.jsonl"), "--output_dir", str(out)]
    ppo = ["step3_rlhf_ppo/main.py", "--actor_model_name_or_path", lm, "--data_path", str(root / "prompts.jsonl"),
           "--output_dir", str(out)]
    evaluate = ["step3_rlhf_ppo/evaluate.py", "--prompts", str(root / "prompts.jsonl"), "--out", str(out / "e.json")]
    chat = ["step1_pretrain_sft/chat.py", "--prompts", str(root / "prompts.jsonl"), "--out", str(out / "a.jsonl")]
    weights, config, tokenizer = "model.safetensors", "config.json", "tokenizer.json"
    return {
        "SFT: truncated weights": ([*sft, "--model_name_or_path", str(root / "lm_truncated")],
                                   root / "lm_truncated" / weights, "not a whole safetensors file"),
        "SFT: malformed config.json": ([*sft, "--model_name_or_path", str(root / "lm_bad_config")],
                                       root / "lm_bad_config" / config, "not valid JSON (line"),
        "SFT: config.json not an object": ([*sft, "--model_name_or_path", str(root / "lm_config_list")],
                                           root / "lm_config_list" / config, "not an object"),
        "SFT: damaged tokenizer.json": ([*sft, "--model_name_or_path", str(root / "lm_bad_tokenizer")],
                                        root / "lm_bad_tokenizer" / tokenizer, "not valid JSON (line"),
        "SFT: --config not valid YAML": ([*sft, "--model_name_or_path", lm, "--config", str(root / "bad.yaml")],
                                         root / "bad.yaml", "not valid YAML at line 3"),
        "SFT: --config a list": ([*sft, "--model_name_or_path", lm, "--config", str(root / "list.yaml")],
                                 root / "list.yaml", "holds a list, not a mapping"),
        "RM: scrambled weights": (["step2_reward_model/main.py", "--model_name_or_path", str(root / "lm_scrambled"),
                                   *pairs], root / "lm_scrambled" / weights, "not a whole safetensors file"),
        "DPO: malformed config.json": (["step3_rlhf_ppo/dpo.py", "--model_name_or_path", str(root / "lm_bad_config"),
                                        *pairs], root / "lm_bad_config" / config, "not valid JSON"),
        "PPO: truncated critic": ([*ppo, "--critic_model_name_or_path", str(root / "rm_truncated")],
                                  root / "rm_truncated" / weights, "not a whole safetensors file"),
        "chat.py: scrambled weights": ([*chat, "--model", str(root / "lm_scrambled")],
                                       root / "lm_scrambled" / weights, "not a whole safetensors file"),
        "chat.py: --config not valid YAML": ([*chat, "--model", lm, "--config", str(root / "bad.yaml")],
                                             root / "bad.yaml", "not valid YAML at line 3"),
        "serve.py: malformed config.json": (["step1_pretrain_sft/serve.py", "--model", str(root / "lm_bad_config")],
                                            root / "lm_bad_config" / config, "not valid JSON"),
        "score_tasks.py: damaged tokenizer.json": (
            ["step1_pretrain_sft/score_tasks.py", "--model", str(root / "lm_bad_tokenizer"), "--eval_task_dir",
             str(root / "eval"), "--out", str(out / "s.json")], root / "lm_bad_tokenizer" / tokenizer, "not valid JSON"),
        "rw_eval.py: truncated weights": (["step2_reward_model/rw_eval.py", "--model", str(root / "rm_truncated"),
                                           "--pairs", str(root / "pairs.jsonl"), "--out", str(out / "r.json")],
                                          root / "rm_truncated" / weights, "not a whole safetensors file"),
        "rw_eval.py: malformed config.json": (["step2_reward_model/rw_eval.py", "--model", str(root / "rm_bad_config"),
                                               "--pairs", str(root / "pairs.jsonl")],
                                              root / "rm_bad_config" / config, "not valid JSON"),
        "evaluate.py: truncated policy": ([*evaluate, "--policy", str(root / "lm_truncated"), "--baseline", lm,
                                           "--reward_model", rm], root / "lm_truncated" / weights,
                                          "not a whole safetensors file"),
        "evaluate.py: damaged reward-model tokenizer": ([*evaluate, "--policy", lm, "--baseline", lm, "--reward_model",
                                                         str(root / "rm_bad_tokenizer")],
                                                        root / "rm_bad_tokenizer" / tokenizer, "not valid JSON"),
        "make_pairs.py: truncated weights": (["data_process/make_pairs.py", "--model", str(root / "lm_truncated"),
                                              "--data", str(root / "rows.jsonl"), "--out", str(out)],
                                             root / "lm_truncated" / weights, "not a whole safetensors file"),
        "make_pairs.py: damaged tokenizer.json": (["data_process/make_pairs.py", "--model",
                                                   str(root / "lm_bad_tokenizer"), "--data", str(root / "rows.jsonl"),
                                                   "--out", str(out)], root / "lm_bad_tokenizer" / tokenizer,
                                                  "not valid JSON"),
    }


# a case of each kind runs as its own process (what a user sees); the other cases run in this one
IN_A_PROCESS = ("SFT: truncated weights", "DPO: malformed config.json", "chat.py: --config not valid YAML",
                "rw_eval.py: truncated weights", "make_pairs.py: damaged tokenizer.json")


def assert_one_error_line(code: int, stderr: str, named: Path, phrase: str, out: Path) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, stderr[-3000:]
    assert str(named) in lines[0] and phrase in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_bad_input_is_one_line_exit_2_nothing_written(bad, tmp_path, case):
    out = tmp_path / "out"
    command, named, phrase = cases(bad, out)[case]
    proc = subprocess.run([sys.executable, *command], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert_one_error_line(proc.returncode, proc.stderr, named, phrase, out)


@pytest.mark.parametrize("case", [name for name in cases(Path("root"), Path("out")) if name not in IN_A_PROCESS])
def test_bad_input_in_process(dist, bad, tmp_path, capsys, case):
    """The other cases, through each entry point's main() in this process (the same main_guard)."""
    out = tmp_path / "out"
    command, named, phrase = cases(bad, out)[case]
    main = importlib.import_module(command[0].removesuffix(".py").replace("/", ".")).main
    with pytest.raises(SystemExit) as exit_info:
        main(command[1:])
    assert_one_error_line(exit_info.value.code, capsys.readouterr().err, named, phrase, out)

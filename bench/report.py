"""Markdown tables of the latest benchmark results: `python -m bench.report` reads bench/results/*.json and
rewrites the part of docs/BENCHMARKS.md between the two `bench:` markers (the commentary around them is
written by hand). `make bench` runs it after the suites."""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- bench:begin (written by python -m bench.report) -->", "<!-- bench:end -->"


def rate(stat: dict, digits: int = 0) -> str:
    """median (min-max) of a timed_windows result."""
    if not isinstance(stat, dict) or "median" not in stat:
        return str(stat.get("error", "n/a")) if isinstance(stat, dict) else "n/a"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(stat['median'])} ({f.format(stat['min'])}-{f.format(stat['max'])})"


def ratio(r) -> str:
    """A ratio: the median (min-max) of per-round ratios, or a plain number from runs before the bench
    interleaved its windows."""
    if isinstance(r, dict):
        return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"
    return f"{r:.2f}x"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def env_line(env: dict) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    flags = f" ({' '.join(env['cpu_flags']) or 'none of avx2/avx512/amx'})" if "cpu_flags" in env else ""
    return (f"{env['cpu']}{flags}, {env['cores']} cores, {env['threads']} torch threads, fast bf16: {env['fast_bf16']}; "
            f"{packages}; GLIBC_TUNABLES={env['glibc_tunables'] or '(unset)'}; {env['date']} UTC.")


def train(r: dict) -> str:
    """One table per preset; results from before the suite took presets hold the tiny preset's runs flat."""
    presets = r.get("presets", {"tiny": r})
    return "\n\n".join(train_preset(name, p, r["peak_flops"]) for name, p in presets.items())


def train_preset(preset: str, r: dict, peak: float) -> str:
    names = {"plain": "plain PyTorch loop (torch AdamW)", "ours_zero0": "our loop, ZeRO-0", "ours_zero1": "our loop, ZeRO-1",
             "ours_zero2": "our loop, ZeRO-2", "ours_zero3": "our loop, ZeRO-3", "hf_trainer": "transformers Trainer",
             "ours_zero0_auto": "our loop, ZeRO-0, --dtype auto", "plain_autocast": "plain loop, bf16 autocast"}
    rows = [[label, rate(r[k]), ratio(r["ratios"][k]), f"{r['mfu'][k]:.2f}" if k in r["mfu"] else "", r[k]["redone"]]
            for k, label in names.items() if k in r]
    params = f", {r['parameters'] / 1e6:.1f} M parameters" if "parameters" in r else ""
    lines = [f"**{preset}**{params}:", "",
             table(["run", "tokens/s median (min-max)", "vs plain, per round", "MFU", "redone"], rows), "",
             f"Our ZeRO-0 loop vs transformers Trainer: **{ratio(r['ratios']['ours_zero0_vs_hf_trainer'])}**"]
    if "ours_zero0_auto_vs_hf_trainer" in r["ratios"]:
        lines[-1] += f"; at --dtype auto ({r['auto_precision']}) vs fp32 Trainer: **{ratio(r['ratios']['ours_zero0_auto_vs_hf_trainer'])}**"
    elif "auto_precision" in r:
        lines[-1] += f"; --dtype auto resolves to {r['auto_precision']} on this CPU, so the fp32 rows are the auto ones"
    lines[-1] += f"; matmul peak {peak / 1e9:.0f} GFLOP/s."
    return "\n".join(lines)


def generate(r: dict) -> str:
    rows = []
    for b in (1, 8):
        cells = [b]
        for name in (f"generate_b{b}_cache", f"generate_b{b}_nocache", f"own_b{b}_zero0", f"own_b{b}_zero3",
                     f"zero3_per_forward_b{b}"):
            cells.append(f"{rate(r[name])}, {ratio(r[f'ratio_{name}_vs_cache'])}")
        cells.append(ratio(r[f"ratio_b{b}_gather_once_vs_per_forward"]))
        rows.append(cells)
    return table(["batch", "HF generate, KV cache", "HF generate, no cache", "own path, ZeRO-0",
                  "own path, ZeRO-3 (gathered once)", "generate on ZeRO-3 module (gathered per forward)",
                  "gather once / per forward"], rows)


def ppo(r: dict) -> str:
    if "skipped" in r:
        return r["skipped"]
    rows = []
    for name, v in r.items():
        if name == "config":
            continue
        shares = ", ".join(f"{k} {100 * x:.0f}%" for k, x in sorted(v["breakdown"].items(), key=lambda kv: -kv[1]))
        rows.append([name, rate(v, 2), f"{v['step_seconds']:.2f}", f"{v['response_tokens']:.1f}", shares])
    return table(["generation batch / reply limit", "samples/s", "s/step", "reply tokens", "time shares"], rows)


def rm(r: dict) -> str:
    return (table(["run", "pairs/s"], [["ours (step 2 loop, ZeRO-0)", rate(r["ours_zero0"], 2)],
                                        ["TRL RewardTrainer", rate(r["trl_reward_trainer"], 2)]])
            + f"\n\nOurs vs TRL, per round: **{ratio(r['ratio_ours_vs_trl'])}**.")


def dpo(r: dict) -> str:
    rows = []
    for mode, label in (("ref_on_the_fly", "reference scored every step"), ("precomputed_ref", "precomputed reference")):
        rows.append([label, rate(r[f"ours_{mode}"], 2), rate(r[f"trl_{mode}"], 2), f"**{ratio(r[f'ratio_{mode}'])}**"])
    return table(["mode", "ours pairs/s", "TRL DPOTrainer pairs/s", "ours / TRL, per round"], rows)


def grpo(r: dict) -> str:
    c = r["config"]
    split = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(r["ours_time_split"].items(), key=lambda kv: -kv[1]))
    out = [f"{c['prompts_per_step']} prompts x {c['group']} replies of {c['reply']} tokens after {c['prompt']}-token "
           f"prompts per step, {c['preset']} preset, {c['loss']}, {c['dtype']}.", "",
           table(["run", "samples/s"], [["ours (grpo.py's trainer, ZeRO-0)", rate(r["ours"], 2)],
                                        ["TRL GRPOTrainer", rate(r["trl_grpo_trainer"], 2)]]),
           "", f"Ours vs TRL, per round: **{ratio(r['ratio_ours_vs_trl'])}**. Our step's time: {split}.", ""]
    rows = []
    for key in sorted(k for k in r if k.startswith("ratio_shared_prefill_reply")):
        reply = key.removeprefix("ratio_shared_prefill_reply")
        rows.append([reply, rate(r[f"shared_prefill_reply{reply}"]), rate(r[f"repeated_rows_reply{reply}"]),
                     f"**{ratio(r[key])}**"])
    rows.sort(key=lambda row: int(row[0]))
    out.append(table(["reply tokens", "one prefill per group, new tokens/s", "prompt repeated G times, new tokens/s",
                      "ratio, per round"], rows))
    return "\n".join(out)


def data(r: dict) -> str:
    c = r["config"]
    out = [f"{c['documents']:,} demo documents ({c['characters']:,} characters).", "",
           table(["stage", "rate median (min-max)"], [
               ["cleaning, exact dedup only (docs/s)", rate(r["clean_exact_dedup"])],
               ["cleaning + MinHash near-dup (docs/s)", rate(r["clean_exact_and_minhash"])],
               ["step 0 packing: tokenise + write (tokens/s)", rate(r["step0_pack_tokens_per_s"])],
               ["step 1 SFT render + pack (tokens/s)", rate(r["sft_render_pack_tokens_per_s"])]]),
           "", f"MinHash takes {100 * r['minhash_share_of_time']:.0f}% of the cleaning time.", "",
           table(["tokenizer", "lines", "characters", "training seconds"],
                 [[k, f"{v['lines']:,}", f"{v['chars']:,}", f"{v['seconds']:.1f}"] for k, v in r["tokenizer_training"].items()])]
    return "\n".join(out)


def scaling(r: dict) -> str:
    rows = []
    for name, v in r.items():
        if name == "config":
            continue
        if "error" in v:
            rows.append([name, "", v["error"], "", ""])
            continue
        rows.append([name, f"{v['parameters'] / 1e6:.1f} M", rate(v), f"{v['mfu']:.2f}", f"{v['peak_rss_mib']:,.0f}"])
    return table(["configuration", "parameters", "tokens/s median (min-max)", "MFU", "peak RSS MiB"], rows)


def memory(r: dict) -> str:
    out = [table(["demo step (make demo)", "peak RSS MiB"], [[k, v] for k, v in r["demo_steps"].items()]), ""]
    rows = []
    for key, label in (("base_ppo_zero3", "ZeRO-3"), ("base_ppo_zero3_offload", "ZeRO-3 + offload (optimizer, reference)")):
        v = r[key]
        rows.append([label, v.get("peak_rss_mib", v.get("error")), v.get("wall_seconds_2_steps", "")])
    out.append(f"PPO with four base-preset models ({r['base_parameters'] / 1e6:.1f} M parameters each), "
               "generation batch 8, replies up to 64 tokens, 2 steps:")
    out += ["", table(["PPO configuration", "peak RSS MiB", "wall seconds (start-up + 2 steps)"], rows)]
    return "\n".join(out)


RENDER = {"train": ("Training throughput", train), "generate": ("Generation", generate), "ppo": ("A PPO step", ppo),
          "rm": ("Reward-model training against TRL", rm), "dpo": ("DPO training against TRL", dpo),
          "grpo": ("A GRPO step against TRL", grpo),
          "data": ("Data steps", data), "scaling": ("Scaling", scaling), "memory": ("Memory", memory)}


def render() -> str:
    parts = [BEGIN]
    for name, (title, fn) in RENDER.items():
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        parts += [f"### {title} (`python -m bench.run --only {name}`)", "", env_line(result["environment"]), "",
                  fn(result[name]), ""]
    parts.append(END)
    return "\n".join(parts)


def main() -> None:
    text = DOC.read_text(encoding="utf-8")
    block = render()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Latest `make bench` run\n\n" + block + "\n"
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()

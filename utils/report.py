"""The report card of a chain run, rebuilt from what the steps wrote (metrics.jsonl, summary.json,
config.json, eval.json, data stats); no model is loaded.

    python -m utils.report OUTPUT            -> OUTPUT/report.md, OUTPUT/report.html, OUTPUT/report/*.png

Per step: data counts, parameters, tokens, wall time, tokens/s and final metrics (bits/char; SFT task
scores; reward-model accuracy; PPO and DPO reward, KL, win-rate vs SFT and degeneration figures; GRPO's
task scores beside SFT's), PNG plots, and the same held-out prompts answered by the SFT, PPO, DPO and GRPO
models side by side (taken from the eval.json files, which sample the SFT model with the same prompts and
seed). Steps not run yet are
left out. The report is a list of blocks rendered twice, as Markdown and as one self-contained HTML page.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import UserError, main_guard
from utils.log import read_metrics
from utils.tasks import TYPED_PREFIX

log = logging.getLogger(__name__)

STEPS = {  # the step a run dir's config.json declares ("step") -> title, in the chain's order
    "pretrain": "Step 1: pretraining",
    "sft": "Step 1: supervised fine-tuning",
    "reward": "Step 2: reward model",
    "ppo": "Step 3: PPO",
    "dpo": "Step 3: DPO",
    "grpo": "Step 3: GRPO (verifiable task rewards)",
}
# run dirs written before config.json declared its step: the chain scripts' dir names
UNDECLARED = {"step1_pretrain": "pretrain", "step1_sft": "sft", "step2_reward": "reward", "step3_ppo": "ppo",
              "step3_dpo": "dpo", "step3_grpo": "grpo"}
TASK_NAMES = {"sentiment_acc": "sentiment", "segmentation_f1": "segmentation F1", "ner_f1": "NER F1"}
TASK_SCORES = tuple(TASK_NAMES)


@dataclass
class Report:
    """Blocks in order: ("h2", text), ("p", text), ("table", (header, rows)), ("img", path)."""

    root: Path
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def add(self, kind: str, value: Any) -> None:
        self.blocks.append((kind, value))

    def markdown(self) -> str:
        out = ["# Report card", ""]
        for kind, value in self.blocks:
            if kind == "h2":
                out += [f"## {value}", ""]
            elif kind == "p":
                out += [value, ""]
            elif kind == "table":
                header, rows = value
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(_cell(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |"
                        for r in rows]
                out.append("")
            elif kind == "img":
                out += [f"![{Path(value).stem}]({Path(value).relative_to(self.root).as_posix()})", ""]
        return "\n".join(out)

    def html(self) -> str:
        body = ["<h1>Report card</h1>"]
        for kind, value in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{html.escape(value)}</h2>")
            elif kind == "p":
                body.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                cells = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>"
                                for r in rows)
                body.append(f"<table><tr>{head}</tr>{cells}</table>")
            elif kind == "img":
                data = base64.b64encode(Path(value).read_bytes()).decode()
                body.append(f'<img alt="{html.escape(Path(value).stem)}" src="data:image/png;base64,{data}">')
        style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
                 "vertical-align:top;text-align:left}img{max-width:100%}")
        return (f'<!doctype html><html lang="zh"><head><meta charset="utf-8"><title>Report card</title>'
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a run ({} when it is missing)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _plot(path: Path, title: str, series: dict[str, tuple[list[float], list[float]]], ylabel: str = "",
          xlabel: str = "optimizer step") -> Path | None:
    """One line per named (x, y) series; None when there is nothing to draw."""
    series = {k: v for k, v in series.items() if v[0]}
    if not series:
        return None
    import matplotlib  # matplotlib only when there is a plot to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name, marker="o" if len(x) < 15 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _xy(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def tokens_per_second(summary: dict[str, Any]) -> float | None:
    """A run's training tokens/s from its summary.json (the RL loops record tokens and wall time only)."""
    wall = summary.get("wall_seconds")
    return summary.get("tok_per_s") or (summary.get("tokens", 0) / wall if wall else None)


def run_title(step: str, run: Path) -> str:
    """The step's title, with the run dir's name when the user chose it (not one of the chain's)."""
    return STEPS[step] if run.name in UNDECLARED else f"{STEPS[step]} ({run.name})"


def _run_facts(run: Path) -> list[list[Any]]:
    """Parameters, steps, tokens, wall time and tokens/s of a training step's run."""
    cfg, summary = read_json(run / "config.json"), read_json(run / "summary.json")
    params = cfg.get("parameters")
    if isinstance(params, dict):
        params = params.get("actor")
    wall = summary.get("wall_seconds")
    tok_s = tokens_per_second(summary)
    facts = [["parameters", params], ["precision", cfg.get("precision")], ["processes", cfg.get("world_size")],
             ["RL steps" if "optimizer_steps_per_ppo_step" in cfg or "optimizer_steps_per_rl_step" in cfg
              else "optimizer steps", summary.get("steps")],
             ["tokens", summary.get("tokens")], ["wall time (min)", wall / 60 if wall else None],
             ["tokens/s", tok_s]]
    if "generation_share" in summary:
        facts.append(["share of time generating", summary["generation_share"]])
    if stop := summary.get("stopped_degenerated"):
        facts.append(["stopped early: held-out replies degenerated", f"at step {stop['step']} ({stop['reason']}); "
                      f"exported the weights of step {stop['exported_step']}"])
    return [f for f in facts if f[1] is not None]


def _data_section(rep: Report, out: Path) -> None:
    stats = read_json(out / "data" / "stats.json")
    meta = read_json(out / "step0" / "tokens" / "meta.json")
    if not stats and not meta:
        return
    rep.add("h2", "Data and tokenizer")
    rows = []
    for name in ("pretrain", "sft", "preference", "prompts"):
        if isinstance(stats.get(name), dict):
            rows.append([name, ", ".join(f"{k} {v:,}" for k, v in stats[name].items())])
    if isinstance(stats.get("eval"), dict):
        rows.append(["eval", ", ".join(f"{k} {v:,}" for k, v in stats["eval"].items())])
    if meta:
        rows.append(["tokenizer", f"vocab {meta.get('vocab_size'):,}"])
        rows.append(["pretraining tokens", ", ".join(f"{k} {v:,}" for k, v in meta.get("num_tokens", {}).items())])
    rep.add("table", (["what", "rows"], rows))


def _eval_table(rep: Report, run: Path) -> dict[str, Any]:
    report = read_json(run / "eval.json")
    if not report:
        return {}
    keys = ("reward_mean", "positive_share", "kl_mean", "length_mean", "distinct_2", "repeat_4gram_share")
    rows = [[name, *["" if report["models"][name].get(k) is None else report["models"][name][k] for k in keys]]
            for name in ("baseline", "policy")]
    rep.add("p", f"Held-out prompts ({report.get('prompts')}), sampled with the same seed; win-rate of the "
                 f"policy over the SFT model under the reward model: {report.get('win_rate', float('nan')):.3f}.")
    rep.add("table", (["model", "RM score", "positive share", "KL to SFT", "length (chars)", "distinct-2",
                       "repeats a 4-gram 3+ times"], rows))
    judge = report.get("judge") or {}
    if judge.get("heldout_accuracy") is not None:
        rep.add("p", f"Positive share: a naive Bayes sentiment judge fitted on {judge['train_reviews']:,} training "
                     f"reviews, {judge['heldout_accuracy']:.3f} accurate on {judge['heldout_reviews']} held-out ones.")
    probes = {name: report["models"][name].get("hackability") for name in ("baseline", "policy")}
    if all(probes.values()):
        _hackability_table(rep, probes, "The reward model on each model's answers: share of answers it prefers "
                                        "over a degraded copy (1.0 = never fooled)")
    return report


def _hackability_table(rep: Report, reports: dict[str, dict], caption: str) -> None:
    """Per-probe 'original wins' shares (utils.probes) of one or more hackability reports, and the
    correlation of score with length."""
    kinds = list(next(iter(reports.values()))["probes"])
    held_out = {k for r in reports.values() for k, p in r["probes"].items() if p.get("held_out")}  # as the probes say
    rep.add("p", caption + "; * marks a kind never in the reward model's training pairs.")
    rows = [[name, *[r["probes"].get(k, {}).get("original_wins", "") for k in kinds], r["length_corr"]]
            for name, r in reports.items()]
    rep.add("table", (["replies", *[k + ("*" if k in held_out else "") for k in kinds], "corr(score, length)"], rows))


def find_runs(out: Path) -> list[tuple[str, Path]]:
    """(step, run dir) of every training run directly under `out`, in the chain's order: each run says
    which step it is in its config.json, so a run the user wrote under any name is found."""
    runs = []
    for run in sorted(p for p in out.iterdir() if p.is_dir()):
        step = read_json(run / "config.json").get("step") or UNDECLARED.get(run.name)
        if step in STEPS:
            runs.append((step, run))
    order = list(STEPS)
    return sorted(runs, key=lambda r: order.index(r[0]))  # stable: runs of one step by name


def _final_eval(run: Path | None) -> dict[str, Any]:
    """The last evaluation row a training run logged ({} for none)."""
    evals = read_metrics(run, "eval") if run is not None else []
    return evals[-1] if evals else {}


def _first_run(runs: list[tuple[str, Path]], step: str) -> Path | None:
    return next((run for s, run in runs if s == step), None)


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "?"


def _headline(step: str, run: Path, sft_run: Path | None) -> str:
    """A run's headline figures in one line: what the README's results table gives for the step."""
    final = _final_eval(run)
    if step == "pretrain":
        first = read_metrics(run, "eval")[:1] or [{}]
        return f"held-out bits/char {_num(first[0].get('bits_per_char'), 2)} -> {_num(final.get('bits_per_char'), 2)}"
    if step == "sft":
        plain = ", ".join(f"{name} {_num(final[k])}" for k, name in TASK_NAMES.items() if k in final)
        typed = ", ".join(_num(final[TYPED_PREFIX + k]) for k in TASK_NAMES if TYPED_PREFIX + k in final)
        return f"{plain} (greedy, held-out)" + (f"; typed prompts: {typed}" if typed else "")
    if step == "reward":
        pre = "eval/" if "eval/accuracy" in final else ""
        kinds = sorted(k[len(pre):-len("/accuracy")] for k in final
                       if k.startswith(pre) and k.endswith("/accuracy") and k.count("/") == pre.count("/") + 1)
        line = f"held-out pair accuracy {_num(final.get(pre + 'accuracy'))}"
        if kinds:
            line += " (" + ", ".join(f"{k} {_num(final[f'{pre}{k}/accuracy'])}" for k in kinds) + ")"
        probes = (read_json(run / "rw_eval.json").get("hackability") or {}).get("probes") or {}
        wins = {k: p["original_wins"] for k, p in probes.items() if isinstance(p.get("original_wins"), int | float)}
        if wins:
            worst = min(wins, key=wins.get)
            line += f"; beats its degraded copies in {_num(min(wins.values()), 2)} ({worst}) to {_num(max(wins.values()), 2)}"
        by_length = read_json(run / "rw_eval_unmatched.json").get("by_length") or {}
        if "gap" in by_length:
            line += (f"; unmatched pairs, chosen longer {_num(by_length['chosen_longer']['accuracy'])} / "
                     f"shorter {_num(by_length['chosen_shorter']['accuracy'])}")
        return line
    if step in ("ppo", "dpo"):
        report = read_json(run / "eval.json")
        if not report:
            return ""
        base, pol = report["models"]["baseline"], report["models"]["policy"]

        def moved(key: str, digits: int) -> str:
            return f"{_num(base.get(key), digits)} -> {_num(pol.get(key), digits)}"

        return (f"RM score {moved('reward_mean', 2)}, win-rate {_num(report.get('win_rate'), 2)} vs SFT, "
                f"KL {_num(pol.get('kl_mean'), 1)} nats, positive replies {moved('positive_share', 2)}, "
                f"length {moved('length_mean', 0)} chars, replies repeating a 4-gram {moved('repeat_4gram_share', 3)}")
    if step == "grpo":
        scores, sft = read_json(run / "tasks.json"), _final_eval(sft_run)
        return ", ".join(f"{name} {_num(sft.get(k))} -> {_num(scores[k])}" for k, name in TASK_NAMES.items()
                         if k in scores) + " (greedy, held-out; SFT -> after RL)"
    return ""


def _results_table(rep: Report, runs: list[tuple[str, Path]]) -> None:
    """The headline table: per run its wall time and headline figures, and the commit the runs were made at
    (the README's results table is this table of one `make demo`)."""
    if not runs:
        return
    sft_run, rows, total = _first_run(runs, "sft"), [], 0.0
    for step, run in runs:
        wall = read_json(run / "summary.json").get("wall_seconds")
        total += wall or 0.0
        rows.append([run_title(step, run), f"{wall / 60:.0f} min" if wall else "", _headline(step, run, sft_run)])
    rows.append(["the steps above, summed", f"{total / 60:.0f} min", "evaluations between the steps not included"])
    commits = sorted({read_json(run / "summary.json").get("commit") or "unknown" for _, run in runs})
    rep.add("h2", "Results")
    rep.add("p", "Code of the runs: commit " + ", ".join(commits) + "; wall times from each run's summary.json.")
    rep.add("table", (["step", "wall time", "result"], rows))


def _step_section(rep: Report, runs: list[tuple[str, Path]], step: str, run: Path, figs: Path) -> None:
    name = run.name
    title = run_title(step, run)
    train, evals = read_metrics(run, "train"), read_metrics(run, "eval")
    if not train and not evals:
        return
    rep.add("h2", title)
    rep.add("table", (["", "value"], _run_facts(run)))
    final = evals[-1] if evals else {}
    plots: list[Path | None] = []
    if step == "pretrain":
        rep.add("p", f"Held-out loss {final.get('loss', float('nan')):.4f}, bits per character "
                     f"{final.get('bits_per_char', float('nan')):.4f} (step 0: {evals[0].get('bits_per_char', float('nan')):.4f}).")
        plots.append(_plot(figs / f"{name}_loss.png", "Pretraining loss",
                           {"train": _xy(train, "loss"), "held-out": _xy(evals, "loss")}, "loss"))
    elif step == "sft":
        scores = TASK_SCORES
        tasks = [[k, final[k]] for k in ("loss", *scores, *(TYPED_PREFIX + s for s in scores)) if k in final]
        rep.add("table", (["held-out metric (typed_: prompts as users type them)", "final"], tasks))
        plots.append(_plot(figs / f"{name}_loss.png", "SFT loss",
                           {"train": _xy(train, "loss"), "held-out": _xy(evals, "loss")}, "loss"))
        plots.append(_plot(figs / f"{name}_tasks.png", "SFT task scores (greedy)",
                           {k: _xy(evals, k) for k in scores}))
    elif step == "reward":
        keys = [k for k in final if k.endswith("accuracy")]
        rep.add("table", (["held-out accuracy", "final"], [[k, final[k]] for k in sorted(keys)]))
        hack = read_json(run / "rw_eval.json").get("hackability")
        if hack:
            _hackability_table(rep, {"held-out chosen replies": hack}, "Hackability (rw_eval.py): share of held-out "
                                                                      "chosen replies scored above a degraded copy")
        by_length = read_json(run / "rw_eval_unmatched.json").get("by_length")
        if by_length:
            rep.add("p", "Length (rw_eval.py on eval/preference_unmatched.jsonl, held-out pairs not matched by "
                         f"length): {by_length['verdict']}.")
        plots.append(_plot(figs / f"{name}_loss.png", "Reward model loss",
                           {"train": _xy(train, "loss"), "held-out": _xy(evals, "loss")}, "loss"))
        plots.append(_plot(figs / f"{name}_accuracy.png", "Reward model accuracy",
                           {k: _xy(evals, k) for k in ("accuracy", "eval/accuracy",
                                                       "eval/review_sentiment/accuracy")}))
    elif step == "ppo":
        _eval_table(rep, run)
        for key, label in (("score_mean", "reward-model score"), ("kl", "KL to the reference (per reply)"),
                           ("entropy", "entropy (per token)"), ("response_length", "reply length (tokens)")):
            plots.append(_plot(figs / f"{name}_{key}.png", f"PPO {label}", {key: _xy(train, key)}, xlabel="PPO step"))
    elif step == "dpo":
        _eval_table(rep, run)
        plots.append(_plot(figs / f"{name}_margin.png", "DPO implicit reward margin",
                           {"train": _xy(train, "margin"), "held-out": _xy(evals, "margin")}))
        plots.append(_plot(figs / f"{name}_accuracy.png", "DPO implicit reward accuracy",
                           {"train": _xy(train, "accuracy"), "held-out": _xy(evals, "accuracy")}))
    elif step == "grpo":
        _task_table(rep, _first_run(runs, "sft"), run)
        _eval_table(rep, run)
        for key, label in (("reward_mean", "reward (weighted sum)"), ("zero_variance_share", "groups with equal rewards"),
                           ("response_length", "reply length (tokens)"), ("entropy", "entropy (per token)")):
            plots.append(_plot(figs / f"{name}_{key}.png", f"GRPO {label}", {key: _xy(train, key)}, xlabel="RL step"))
        plots.append(_plot(figs / f"{name}_eval.png", "GRPO held-out reward (greedy)",
                           {k.removeprefix("eval_"): _xy(evals, k) for k in (evals[-1] if evals else {})
                            if k.startswith("eval_reward")}, xlabel="RL step"))
    for p in plots:
        if p is not None:
            rep.add("img", p)


def _task_table(rep: Report, sft_run: Path | None, run: Path) -> None:
    """The held-out task scores of the RL export (tasks.json) beside the SFT model's final evaluation."""
    scores = read_json(run / "tasks.json")
    sft = _final_eval(sft_run)
    keys = [k for p in ("", TYPED_PREFIX) for k in (p + s for s in TASK_SCORES) if k in scores]
    if keys:
        rep.add("table", (["held-out task (greedy; typed_: prompts as users type them)", "SFT", "after RL"],
                          [[k, sft.get(k, ""), scores[k]] for k in keys]))


def _side_by_side(rep: Report, runs: list[tuple[str, Path]], n: int = 5) -> None:
    policies = [(step, run) for step, run in runs if step in ("ppo", "dpo", "grpo")]
    evals = {step.upper() if run.name in UNDECLARED else run.name: read_json(run / "eval.json")
             for step, run in policies}
    sources = {name: r["samples"] for name, r in evals.items() if r.get("samples")}
    if not sources:
        return
    first = next(iter(sources.values()))
    reference = next(r for r in evals.values() if r)
    same = all(r.get("sampling") == reference.get("sampling") for r in evals.values() if r)
    rep.add("h2", "The same prompts, answered by each model")
    rep.add("p", "Sampled with the same seed and settings; the SFT answers come from the first evaluation"
                 + ("" if same else " (the evaluations used different sampling settings)") + ".")
    rows = []
    for i, sample in enumerate(first[:n]):
        row = [sample["prompt"], sample["baseline"]]
        row += [s[i]["policy"] if i < len(s) and s[i]["prompt"] == sample["prompt"] else "" for s in sources.values()]
        rows.append(row)
    rep.add("table", (["prompt", "SFT", *sources], rows))


def build_report(out: str | Path) -> Report:
    """Write OUTPUT/report.md, OUTPUT/report.html and the plots under OUTPUT/report/."""
    root = Path(out)
    if not root.is_dir():
        raise UserError(f"{out}: not a directory: give the chain's OUTPUT dir (e.g. outputs/demo)")
    rep, figs = Report(root), root / "report"
    runs = find_runs(root)
    _results_table(rep, runs)
    _data_section(rep, root)
    for step, run in runs:
        _step_section(rep, runs, step, run, figs)
    _side_by_side(rep, runs)
    if not rep.blocks:
        raise UserError(f"{out}: holds no step outputs (data/, step1_pretrain/, ...): run the chain first")
    (root / "report.md").write_text(rep.markdown(), encoding="utf-8")
    (root / "report.html").write_text(rep.html(), encoding="utf-8")
    return rep


@main_guard
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        raise UserError("usage: python -m utils.report OUTPUT (the chain's output dir, e.g. outputs/demo)")
    build_report(args[0])
    log.info("wrote %s and %s", Path(args[0]) / "report.md", Path(args[0]) / "report.html")


if __name__ == "__main__":
    from utils.log import setup_logging

    setup_logging()
    main()

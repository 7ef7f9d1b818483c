"""The project's studies, each one command: the results table, the paper's headline, the ablations.

    python experiments.py results             # dense, LoRA, SkipGPT at 10 / 25 / 40%, static baselines, with LoRA too (hours)
    python experiments.py headline            # 40% + LoRA (3 seeds) against dense and ShortGPT + LoRA, 1,000 documents per task
    python experiments.py headline --stage1_iters 1600   # the same with 1,600 stage-1 steps, 1 seed (hours; resumes)
    python experiments.py ablations           # router kind, MLP router input, weighting, budget, K/V, joint, alpha; 3 seeds
    python experiments.py ablations --quick   # the same rows, 16 short steps each, ranked beside the full study (~8 min)
    python experiments.py curve               # stage 1 at 25% for 100 ... 3,200 steps: the learning curve (hours; resumes)

Each study is a list of jobs: training runs (train_stage1.py, train_stage2.py) and evaluations
(eval.py), run as subprocesses, --jobs at a time on one CPU thread each (on this 2-core machine,
two one-thread jobs finish sooner than one two-thread job after the other). A job whose output
already exists is not run again, so an interrupted study resumes where it stopped; --rerun_evals
redoes the evaluations. Every job's output goes to its log file under the study's directory. Then
the speeds are measured, alone and interleaved (bench.prefill_speedups), and the study writes its markdown
table, its figures and a JSON file, and prints the table.

results (out/results/):
  rows      dense; dense + LoRA; at 10%, 25% and 40% of block parameters (RESULT_SPARSITIES): SkipGPT
            stage 1 trained for it, the same + LoRA, ShortGPT and attention drop at the sparsity that
            SkipGPT reached on the evaluation text (attention drop on the module count where parameters
            are out of its reach), ShortGPT with as many blocks removed + the same LoRA (the fair static
            control); the 25% routers recalibrated to 10% and 40% (the knob).
  sparsity  eval.py --sparsity S recalibrates each routed model's offset on text like the evaluation's
            (held-out task documents and LAMBADA passages), so rows compare at the sparsity named.
  accuracy  per task the metric lm-evaluation-harness reports (tasks.HARNESS_METRIC), their average, and
            plain acc's average beside it; BoolQ's majority-class rate under the table.
  knowledge the share of tasks.KNOWLEDGE's factual prompts answered as the dense model answers them.
  curve     quality_vs_sparsity.png: LAMBADA perplexity and the average against the sparsity reached.
  speed     prefill of 512 tokens of general text (LAMBADA), every model's own routing on the fast path.
headline (out/headline/):
  the paper's claim, measured: stage 1 at 40% of block parameters then LoRA (out/stage1-t0.40,
  out/stage2-t0.40), evaluated with its offset recalibrated to 40% on task-like text; ShortGPT with
  as many blocks removed plus the same LoRA (train_stage2.py --shortgpt N); dense. The first 1,000
  documents of every task (all of one that has fewer); the difference of each average from dense's,
  with its standard error from the paired per-document outcomes (eval.paired_difference). SkipGPT's
  two stages run with --seeds seeds (1337, 1338, ...; out/stage1-t0.40-seed1338, ...), the first
  seed's comparison whole before the next seed trains; the table gives each seed and their mean.
  --stage1_iters N: the same study with N stage-1 steps (one seed unless --seeds), every run and
  result in runs/headline-stepsN/ (tracked by git, so that it resumes across sessions).
curve (runs/learning_curve/, tracked by git so that the study resumes across machines and sessions):
  stage 1 at 25% with the default settings for CURVE_STEPS steps (same seed), each run then evaluated
  with eval.py --tasks none (held-out general and plays perplexity, LAMBADA, the factual prompts) at its
  own calibrated offset, beside ShortGPT with as many blocks removed as the run's sparsity matches
  (train_stage1.py's own comparison) and dense. A training job that stopped resumes from its last
  checkpoint (every 50 steps). The table, docs/learning_curve.png (routed / dense perplexity against
  training tokens, ShortGPT and 1.0 beside it; the factual answers kept), and a power-law fit of
  (routed / dense - 1) against tokens, extrapolated to the paper's budget (CURVE_PAPER_TOKENS). Points
  not trained yet are left out of the table and the fit.
ablations (out/ablations/, quick: out/ablations-quick/):
  one stage-1 run per row and seed (3 seeds, the quick form 1), each row changing one setting of the
  default, and the two-stage row (LoRA on the default row's routers of the same seed) beside the
  joint one; val perplexity (mean and range over the seeds) and sparsity from the runs' summaries;
  zero-shot and LAMBADA on the default subsets (first seed) for the default, joint and two-stage rows
  and for rows whose perplexity differs from the default row's by more than ZERO_SHOT_PPL_RATIO
  (smaller differences do not show above the zero-shot noise), none in --quick form; speed as
  above, on held-out general text (where the rows' sparsity was measured). The quick form (--quick,
  one seed, out/ablations-quick/) is what fits a class period: QUICK_TRAIN and QUICK_STAGE1's flags,
  no zero-shot, no speed; when the full study's ablations.json is in --full_dir it prints both
  rankings side by side with Spearman's rank correlation. One row is one command:
      python experiments.py ablations --rows router-mlp --seeds 1
  trains what is missing (that row and the default row, which every row is compared with) and prints
  the table with the two.
"""
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

import numpy as np
from tqdm import tqdm

import assets
import baselines
import bench
import eval as eval_mod
import fast
import tasks
from analyze import general_windows
from checkpoint import load, resolve
from common import load_split, parse_bool, val_windows
from convert import ensure_default_model
from errors import ArgumentParser, UserError, cli
from lora import merge_lora
from router import Routing, block_params

PY = sys.executable
ZERO_SHOT_PPL_RATIO = 1.5              # ablation rows this far from the default row's perplexity get zero-shot
# The quick form's levers, each measured (README, "Ablations"): fewer and smaller steps, fewer held-out
# windows, a cheaper offset calibration; no zero-shot and no speed column
QUICK_TRAIN = ["--max_iters", "16", "--batch_size", "2", "--val_windows", "16"]  # both stages
QUICK_STAGE1 = ["--calib_windows", "4"]                                          # stage 1 only
FIRST_SEED = 1337                      # the first seed of every study's runs (the training scripts' default)
SPEED_REPEATS = 9                      # timed repetitions per model (medians): the shared machine is noisy


# ----------------------------------------------------------------------------------------------
# Jobs: a command, the file it produces, the jobs it waits for

class Job:
    def __init__(self, name, cmd, output, deps=()):
        self.name, self.output, self.deps = name, Path(output), list(deps)
        self.cmd = cmd  # a list, or a callable returning one (for commands that need earlier results)


def run_jobs(jobs, n_parallel, log_dir):
    """Run every job whose output is missing, n_parallel at a time, each after its deps. -> failed names."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = [j for j in jobs if not j.output.exists()]
    done = {j.name for j in jobs if j.output.exists()}
    failed, running = set(), {}
    if not pending:
        return failed
    bar = tqdm(total=len(pending), desc="jobs", dynamic_ncols=True)
    while pending or running:
        for j in list(pending):
            if any(d in failed for d in j.deps):
                pending.remove(j)
                failed.add(j.name)
                bar.write(f"skipped {j.name}: a job it needs failed")
                bar.update()
            elif len(running) < n_parallel and all(d in done for d in j.deps):
                cmd = j.cmd() if callable(j.cmd) else j.cmd
                log = open(log_dir / f"{j.name}.log", "w")
                log.write(" ".join(map(str, cmd)) + "\n\n")
                log.flush()
                running[j.name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, j, time.time())
                pending.remove(j)
                bar.write(f"started {j.name}: {' '.join(map(str, cmd[1:]))}")
        for name, (proc, log, j, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            ok = proc.returncode == 0 and j.output.exists()
            (done if ok else failed).add(name)
            bar.write(f"{'finished' if ok else 'FAILED'} {name} in {time.time() - t0:.0f} s"
                      + ("" if ok else f" (see {log_dir / (name + '.log')})"))
            bar.update()
        time.sleep(1)
    bar.close()
    return failed


def write_study(d, name, table, summary, figure):
    """d/name.md and d/name.json, the table on stdout, the JSON as the last line (after the failures, if any)."""
    (d / f"{name}.md").write_text(table + "\n")
    (d / f"{name}.json").write_text(json.dumps(summary, indent=1))
    print("\n" + table)
    print(f"\nwrote {d / (name + '.md')}, {d / (name + '.json')}, {figure}")
    if summary["failed"]:
        raise UserError(f"{len(summary['failed'])} job(s) failed: {', '.join(summary['failed'])}; logs in {d / 'logs'}")
    print(json.dumps(summary))


def eval_cmd(out, *flags):
    return [PY, "eval.py", "--threads", "1", "--out", str(out), *map(str, flags)]


def training_cmd(script, run, *flags, resumable=True):
    """A training job's command, made when the job starts (after the runs it waits for). A long study's
    run resumes from its last checkpoint; one that never ran (or a stage-2 run whose optimizer state
    stayed on another machine) starts over."""
    def cmd():
        again = (["--resume", "true"] if (Path(run) / "ckpt.pt").exists() else ["--overwrite", "true"]) if resumable else []
        return [PY, script, "--out_dir", str(run), "--threads", "1", *map(str, flags), *again]
    return cmd


def read(path):
    return json.loads(Path(path).read_text())


def timed_model(path, offset=None):
    """A converted model or a run, ready to time: LoRA merged in, routed on the fast path at `offset`
    (default: the run's own). -> (model, routing factory or None)"""
    model = fast.accelerate(merge_lora(load(path)))
    if model.router_cfg is None:
        return model, None
    offset = model.routing_offset if offset is None else offset
    return model, (lambda: Routing(mode="hard", offset=offset, fast=True))


def load_for_speed(result, base_path):
    """The model an eval.py result describes (its "model" is the evaluated path), ready to time."""
    if result["kind"] == "shortgpt":
        return fast.accelerate(load(base_path)).without_blocks(result["removed_blocks"]), None
    if result["kind"] == "attention_drop":
        return baselines.drop_attention(fast.accelerate(load(base_path)), result["dropped_attention"]), None
    return timed_model(resolve(result["model"]), result.get("offset"))


# ----------------------------------------------------------------------------------------------
# The results study

RESULT_SPARSITIES = (0.10, 0.25, 0.40)  # SkipGPT trained for each, the static baselines matched to each


def results_rows(d, n_layers):
    """(name, label, job) for every evaluated model, the training jobs they need, and the knob's jobs
    (the 25% routers recalibrated to the other sparsities)."""
    def run(s):
        return "out/stage1" if s == 0.25 else f"out/stage1-t{s:.2f}"

    def lora_run(s):
        return "out/stage2" if s == 0.25 else f"out/stage2-t{s:.2f}"
    train = [Job("train-stage2-dense", [PY, "train_stage2.py", "--dense", "true", "--threads", "1"],
                 "out/stage2-dense/summary.json")]
    rows = [("dense", "dense SmolLM2-135M", Job("dense", eval_cmd(d / "dense.json"), d / "dense.json")),
            ("dense+lora", "dense + LoRA", Job("dense+lora", eval_cmd(d / "dense+lora.json", "--model", "out/stage2-dense"),
                                               d / "dense+lora.json", ["train-stage2-dense"]))]
    for sp in RESULT_SPARSITIES:
        s, pct = f"{sp:.2f}", f"{sp:.0%}"
        blocks = baselines.blocks_for_param_sparsity(n_layers, sp)
        train += [Job(f"train-stage1-{s}", [PY, "train_stage1.py", "--target_sparsity", s, "--out_dir", run(sp), "--threads", "1"],
                      f"{run(sp)}/summary.json"),
                  Job(f"train-stage2-{s}", [PY, "train_stage2.py", "--init_from", run(sp), "--out_dir", lora_run(sp),
                                            "--threads", "1"], f"{lora_run(sp)}/summary.json", [f"train-stage1-{s}"]),
                  Job(f"train-shortgpt{blocks}+lora", [PY, "train_stage2.py", "--shortgpt", str(blocks), "--out_dir",
                                                       f"out/stage2-shortgpt{blocks}", "--threads", "1"],
                      f"out/stage2-shortgpt{blocks}/summary.json")]
        reached = lambda src=d / f"skipgpt-{s}.json": read(src)["sparsity"]  # what SkipGPT skipped of the evaluated text
        rows += [(f"skipgpt-{s}", f"SkipGPT stage 1, {pct}", Job(f"skipgpt-{s}", eval_cmd(
                     d / f"skipgpt-{s}.json", "--model", run(sp), "--sparsity", s), d / f"skipgpt-{s}.json", [f"train-stage1-{s}"])),
                 (f"skipgpt-{s}+lora", f"SkipGPT stage 1 + LoRA, {pct}", Job(f"skipgpt-{s}+lora", eval_cmd(
                     d / f"skipgpt-{s}+lora.json", "--model", lora_run(sp), "--sparsity", s), d / f"skipgpt-{s}+lora.json",
                     [f"train-stage2-{s}"])),
                 (f"shortgpt@{s}", f"ShortGPT at SkipGPT-{pct}'s sparsity", Job(f"shortgpt@{s}", lambda s=s, p=reached: eval_cmd(
                     d / f"shortgpt@{s}.json", "--shortgpt_match", "--match_sparsity", round(p()["param_sparsity"], 4)),
                     d / f"shortgpt@{s}.json", [f"skipgpt-{s}"])),
                 (f"shortgpt{blocks}+lora", f"ShortGPT ({blocks} blocks) + LoRA, {pct}", Job(f"shortgpt{blocks}+lora", eval_cmd(
                     d / f"shortgpt{blocks}+lora.json", "--model", f"out/stage2-shortgpt{blocks}"),
                     d / f"shortgpt{blocks}+lora.json", [f"train-shortgpt{blocks}+lora"])),
                 (f"attention-drop@{s}", f"attention drop at SkipGPT-{pct}'s sparsity", Job(
                     f"attention-drop@{s}", lambda s=s, p=reached: eval_cmd(
                         d / f"attention-drop@{s}.json", "--attention_drop_match", "--match_sparsity", round(p()["param_sparsity"], 4),
                         "--match_modules", round(p()["module_sparsity"], 4)), d / f"attention-drop@{s}.json", [f"skipgpt-{s}"]))]
    knob = [(f"skipgpt-0.25@{sp:.2f}", f"SkipGPT 25% routers, recalibrated to {sp:.0%}", Job(
                f"skipgpt-0.25@{sp:.2f}", eval_cmd(d / f"skipgpt-0.25@{sp:.2f}.json", "--model", run(0.25), "--sparsity", f"{sp:.2f}"),
                d / f"skipgpt-0.25@{sp:.2f}.json", ["train-stage1-0.25"])) for sp in RESULT_SPARSITIES if sp != 0.25]
    return train, rows + knob


def study_results(a):
    d = Path(a.out_dir or "out/results")
    base = load(ensure_default_model())
    train, rows = results_rows(d, base.args.n_layers)
    if a.rerun_evals:
        for j in [r[2] for r in rows]:
            j.output.unlink(missing_ok=True)
    failed = run_jobs(train + [r[2] for r in rows], a.jobs, d / "logs")
    results = {name: read(job.output) for name, _, job in rows if job.output.exists()}
    if "dense" not in results:
        raise UserError(f"the dense evaluation failed; see {d / 'logs' / 'dense.log'}")

    # -- speed: prefill of 512 tokens of general text (the first LAMBADA passages), every model as evaluated
    print(f"measuring speed (prefill of 512 tokens of LAMBADA text, 2 threads, interleaved, median of {SPEED_REPEATS}) ...")
    base_path = assets.DEFAULT_MODEL_DIR
    text = general_windows(base.tokenizer, block=512)[:1, :512]
    speeds = bench.prefill_speedups({name: load_for_speed(r, base_path) for name, r in results.items()}, text, repeats=SPEED_REPEATS)

    # -- the table: the harness metric per task (tasks.HARNESS_METRIC), their average, and plain acc's average
    dense = results["dense"]
    lines = ["| model | param sparsity (attn / MLP skip) | general ppl | plays ppl | LAMBADA ppl | knowledge | "
             + " | ".join(f"{t} ({tasks.HARNESS_METRIC[t]})" for t in tasks.TASKS)
             + " | average (% of dense) | average acc | prefill speedup |",
             "|---" * (len(tasks.TASKS) + 9) + "|"]
    for name, label, _ in rows:
        if name not in results:
            lines.append(f"| {label} | (failed: see {d / 'logs' / (name + '.log')}) |")
            continue
        r, sp = results[name], results[name]["sparsity"]
        lines.append(f"| {label} | {sp['param_sparsity']:.3f} ({sp['attn_skip']:.2f} / {sp['mlp_skip']:.2f}) | "
                     f"{r['ppl']['general']:.1f} | {r['ppl']['shakespeare']:.1f} | {r['ppl']['lambada']:.1f} | "
                     f"{r['knowledge']:.0%} | "
                     + " | ".join(f"{r['tasks'][t][tasks.HARNESS_METRIC[t]]:.3f}" for t in tasks.TASKS)
                     + f" | {r['avg_harness']:.3f} ({r['avg_harness'] / dense['avg_harness']:.0%}) | {r['avg_acc']:.3f} "
                     f"| {speeds[name][1]:.2f}x |")
    n = {t: dense["tasks"][t]["n"] for t in tasks.TASKS}
    p = {t: dense["tasks"][t][tasks.HARNESS_METRIC[t]] for t in tasks.TASKS}
    se_avg = math.sqrt(sum(p[t] * (1 - p[t]) / n[t] for t in tasks.TASKS)) / len(tasks.TASKS)
    lines.append(f"\nDocuments per task: {', '.join(f'{t} {n[t]}' for t in tasks.TASKS)}. Standard error of the "
                 f"average {se_avg:.3f} (unpaired; `python experiments.py headline` gives paired ones on 1,000 documents). "
                 f"BoolQ's majority class is {dense['tasks']['boolq']['majority']:.3f} of its documents: dense is below it, so "
                 f"a model that drifts toward one answer gains there without being better.")
    table = "\n".join(lines)

    # -- the headline figure: quality against the sparsity reached on the evaluated text
    points = {"SkipGPT (trained for each sparsity)": [], "SkipGPT 25% routers, recalibrated": [], "ShortGPT": [],
              "attention drop": [], "SkipGPT + LoRA": [], "ShortGPT + LoRA": []}
    for name, r in results.items():
        for key in quality_curves(name, r["kind"]):
            points[key].append((r["sparsity"]["param_sparsity"], r["ppl"]["lambada"], r["ppl"]["general"], r["avg_harness"]))
    plot_quality(points, dense, d / "quality_vs_sparsity.png")
    summary = {"rows": {name: {**{k: results[name][k] for k in ("ppl", "knowledge", "avg_acc", "avg_acc_norm", "avg_harness",
                                                                 "sparsity")},
                               "tasks": {t: {k: results[name]["tasks"][t][k] for k in ("acc", "acc_norm", "n", "majority")}
                                         for t in tasks.TASKS},
                               "prefill_tokens_per_s": speeds[name][0], "prefill_speedup": speeds[name][1]}
                        for name in results},
               "curve": points, "se_avg": se_avg, "failed": sorted(failed)}
    write_study(d, "results", table, summary, d / "quality_vs_sparsity.png")


def quality_curves(name, kind):
    """The curves of the quality figure a results row belongs to (the 25% routers' own row: two)."""
    if name.startswith("skipgpt"):
        if "lora" in name:
            return ["SkipGPT + LoRA"]
        if "@" in name:
            return ["SkipGPT 25% routers, recalibrated"]
        return ["SkipGPT (trained for each sparsity)"] + (["SkipGPT 25% routers, recalibrated"] if name == "skipgpt-0.25" else [])
    return {"shortgpt": ["ShortGPT"], "attention_drop": ["attention drop"], "shortgpt+lora": ["ShortGPT + LoRA"]}.get(kind, [])


def plot_quality(points, dense, path):
    import plots  # noqa: F401  (Agg backend)
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"SkipGPT (trained for each sparsity)": "o-", "SkipGPT 25% routers, recalibrated": "o:",
              "ShortGPT": "^--", "attention drop": "s:", "SkipGPT + LoRA": "*-", "ShortGPT + LoRA": "v--"}
    for key, pts in points.items():
        if not pts:
            continue
        pts = sorted(pts)
        x = [0.0] + [q[0] for q in pts]
        a.plot(x, [dense["ppl"]["lambada"]] + [q[1] for q in pts], styles[key], label=key)
        b.plot(x, [dense["avg_harness"]] + [q[3] for q in pts], styles[key], label=key)
    a.set_yscale("log"), a.set_ylabel("LAMBADA perplexity (log)")
    b.set_ylabel("7-task average (lm-evaluation-harness metric per task)")
    for ax in (a, b):
        ax.set_xlabel("block parameters skipped on the evaluation text"), ax.grid(alpha=0.3, which="both")
    b.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: quality against sparsity, dynamic (SkipGPT) vs static pruning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The paper's headline: 40% of block parameters, stage 1 + LoRA, against dense and ShortGPT + LoRA

HEADLINE_SPARSITY = 0.40
HEADLINE_LIMIT = 1000  # documents per task (all of a task that has fewer), HellaSwag included


def study_headline(a):
    # the long form (--stage1_iters N) lives under runs/ (tracked by git) so that it resumes across sessions
    long_form = a.stage1_iters is not None
    d = Path(a.out_dir or (f"runs/headline-steps{a.stage1_iters}" if long_form else "out/headline"))
    runs = d if long_form else Path("out")
    base = load(ensure_default_model())
    n_blocks = baselines.blocks_for_param_sparsity(base.args.n_layers, HEADLINE_SPARSITY)
    s = f"{HEADLINE_SPARSITY:.2f}"
    limits = ["--limit", a.limit, "--hellaswag_limit", a.limit]
    seeds = [FIRST_SEED + k for k in range(a.seeds)]

    def tag(seed):  # the first seed keeps the plain names (out/stage1-t0.40, the README's commands)
        return "" if seed == FIRST_SEED else f"-seed{seed}"

    def training(script, run, *flags):  # only the long form resumes: its runs are tracked under runs/
        return training_cmd(script, run, *flags, resumable=long_form)

    def skipgpt_jobs(seed):  # stage 1 at 40%, LoRA on it, its evaluation recalibrated to 40% on task-like text
        t = tag(seed)
        stage1, stage2 = runs / f"stage1-t{s}{t}", runs / f"stage2-t{s}{t}"
        steps = ["--max_iters", a.stage1_iters] if long_form else []
        return [Job(f"train-stage1{t}", training("train_stage1.py", stage1, "--target_sparsity", s, "--seed", seed, *steps),
                    stage1 / "summary.json"),
                Job(f"train-stage2{t}", training("train_stage2.py", stage2, "--init_from", stage1, "--seed", seed),
                    stage2 / "summary.json", [f"train-stage1{t}"]),
                Job(f"skipgpt+lora{t}", eval_cmd(d / f"skipgpt+lora{t}.json", "--model", stage2, "--sparsity", s, *limits),
                    d / f"skipgpt+lora{t}.json", [f"train-stage2{t}"])]
    shortgpt_run = runs / f"stage2-shortgpt{n_blocks}"
    static = [Job("train-shortgpt+lora", training("train_stage2.py", shortgpt_run, "--shortgpt", n_blocks), shortgpt_run / "summary.json"),
              Job("dense", eval_cmd(d / "dense.json", *limits), d / "dense.json"),
              Job("shortgpt+lora", eval_cmd(d / "shortgpt+lora.json", "--model", shortgpt_run, *limits),
                  d / "shortgpt+lora.json", ["train-shortgpt+lora"])]
    # seed-major: the first seed's comparison (with dense and ShortGPT + LoRA) is whole before more seeds train
    first = skipgpt_jobs(seeds[0])
    jobs = first[:2] + static[:2] + first[2:] + static[2:] + [j for seed in seeds[1:] for j in skipgpt_jobs(seed)]
    evals = [j for j in jobs if not j.name.startswith("train-")]
    if a.rerun_evals:
        for j in evals:
            j.output.unlink(missing_ok=True)
    failed = run_jobs(jobs, a.jobs, d / "logs")
    if not all(j.output.exists() for j in evals):
        raise UserError(f"job(s) failed: {', '.join(sorted(failed))}; logs in {d / 'logs'}")
    results = {j.name: read(j.output) for j in evals}
    dense, shortgpt = results["dense"], results["shortgpt+lora"]
    routed = {seed: results[f"skipgpt+lora{tag(seed)}"] for seed in seeds}

    all_params = sum(p.numel() for p in base.parameters())
    block_share = block_params(base.args) * base.args.n_layers / all_params
    lines = [f"| model | block parameters skipped (evaluated text) | all parameters | 7-task average (harness metric) | "
             f"% of dense | minus dense (paired SE) | general ppl | LAMBADA ppl |", "|---|---|---|---|---|---|---|---|"]

    minus_dense = {seed: eval_mod.paired_difference(r, dense) for seed, r in routed.items()}
    minus_shortgpt = {seed: eval_mod.paired_difference(r, shortgpt) for seed, r in routed.items()}

    def one(label, r, diff=""):  # a model's row; diff: (difference from dense, paired SE)
        ps, avg = r["sparsity"]["param_sparsity"], r["avg_harness"]
        return (f"| {label} | {ps:.3f} | {ps * block_share:.3f} | {avg:.4f} | {avg / dense['avg_harness']:.1%} | "
                f"{'{:+.4f} ({:.4f})'.format(*diff) if diff else ''} | {r['ppl']['general']:.1f} | {r['ppl']['lambada']:.1f} |")
    lines.append(one("dense SmolLM2-135M", dense))
    label = f"SkipGPT stage 1{f' ({a.stage1_iters:,} steps)' if long_form else ''} + LoRA, {HEADLINE_SPARSITY:.0%}"
    for seed, r in routed.items():
        lines.append(one(label + (f", seed {seed}" if len(seeds) > 1 else ""), r, minus_dense[seed]))
    if len(seeds) > 1:  # mean over the seeds, (range) beside the average and the difference
        avgs = [r["avg_harness"] for r in routed.values()]
        diffs = [d for d, _ in minus_dense.values()]
        ps = mean(r["sparsity"]["param_sparsity"] for r in routed.values())
        lines.append(f"| {label}: mean of {len(seeds)} seeds (range) | {ps:.3f} | {ps * block_share:.3f} | "
                     f"{mean(avgs):.4f} ({min(avgs):.4f}-{max(avgs):.4f}) | {mean(avgs) / dense['avg_harness']:.1%} | "
                     f"{mean(diffs):+.4f} ({min(diffs):+.4f} to {max(diffs):+.4f}) | "
                     f"{mean(r['ppl']['general'] for r in routed.values()):.1f} | {mean(r['ppl']['lambada'] for r in routed.values()):.1f} |")
    lines.append(one(f"ShortGPT ({n_blocks} blocks removed) + LoRA", shortgpt, eval_mod.paired_difference(shortgpt, dense)))

    def verdict(diff, se):
        return ("matches dense (within two paired standard errors)" if abs(diff) <= 2 * se else
                "does not match dense (more than two paired standard errors below)" if diff < 0 else
                "is above dense by more than two paired standard errors")
    n = {t: r["n"] for t, r in dense["tasks"].items()}
    for seed in seeds:
        (diff_d, se_d), (diff_s, se_s) = minus_dense[seed], minus_shortgpt[seed]
        lines.append(f"\nSkipGPT + LoRA{f' (seed {seed})' if len(seeds) > 1 else ''} {verdict(diff_d, se_d)}: "
                     f"{diff_d:+.4f} +- {se_d:.4f}, {routed[seed]['avg_harness'] / dense['avg_harness']:.1%} of dense. "
                     f"Against ShortGPT + LoRA: {diff_s:+.4f} +- {se_s:.4f} "
                     f"({'above by more than two standard errors' if diff_s > 2 * se_s else 'not above by two standard errors'}).")
    lines.append(f"\n{HEADLINE_SPARSITY:.0%} of block parameters is {HEADLINE_SPARSITY * block_share:.1%} of all "
                 f"{all_params / 1e6:.1f}M parameters (the embeddings are the rest). "
                 + (f"Seeds {seeds[0]}-{seeds[-1]} for SkipGPT's two stages; ShortGPT + LoRA and dense: one run each. "
                    if len(seeds) > 1 else "")
                 + "Documents per task: " + ", ".join(f"{t} {k}" for t, k in n.items()) + ". Average: acc_norm for PIQA, "
                 f"HellaSwag, ARC and OpenBookQA, acc for BoolQ and WinoGrande; BoolQ's majority class "
                 f"{dense['tasks']['boolq']['majority']:.3f}.")
    table = "\n".join(lines)
    summary = {"rows": {name: {"avg_harness": r["avg_harness"], "avg_acc": r["avg_acc"], "avg_acc_norm": r["avg_acc_norm"],
                               "param_sparsity": r["sparsity"]["param_sparsity"], "ppl": r["ppl"],
                               "tasks": {t: {k: v[k] for k in ("acc", "acc_norm", "n", "majority")} for t, v in r["tasks"].items()}}
                        for name, r in results.items()},
               "seeds": seeds, "minus_dense": minus_dense[seeds[0]], "minus_shortgpt_lora": minus_shortgpt[seeds[0]],
               "minus_dense_by_seed": {str(k): v for k, v in minus_dense.items()},
               "minus_shortgpt_lora_by_seed": {str(k): v for k, v in minus_shortgpt.items()},
               "block_share_of_all": block_share, "failed": sorted(failed)}
    (d / "headline.md").write_text(table + "\n")
    (d / "headline.json").write_text(json.dumps(summary, indent=1))
    print("\n" + table)
    print(f"\nwrote {d / 'headline.md'}, {d / 'headline.json'}")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


# ----------------------------------------------------------------------------------------------
# The learning curve: does the gap to dense close with more training tokens?

CURVE_STEPS = (100, 200, 400, 800, 1600, 3200)
CURVE_DIR = "runs/learning_curve"
CURVE_PAPER_TOKENS = 10_000 * 16 * 4096  # the paper: 10,000 steps of 16 sequences of up to 4,096 tokens


def study_curve(a):
    d = Path(a.out_dir or CURVE_DIR)
    steps = [n for n in CURVE_STEPS if a.max_steps is None or n <= a.max_steps]

    def shortgpt_cmd(n):  # as many blocks removed as train_stage1.py matched to the run's sparsity
        blocks = read(d / f"steps{n}" / "summary.json")["shortgpt_blocks"]
        return eval_cmd(d / f"shortgpt-steps{n}.json", "--shortgpt", blocks, "--tasks", "none")

    jobs = [Job("dense", eval_cmd(d / "dense.json", "--tasks", "none"), d / "dense.json")]
    for n in steps[-1:] + steps[:-1]:  # the longest first (it sets when the study ends), beside the others in order
        jobs.append(Job(f"train-steps{n}", training_cmd("train_stage1.py", d / f"steps{n}", "--max_iters", n),
                        d / f"steps{n}" / "summary.json"))
        jobs.append(Job(f"eval-steps{n}", eval_cmd(d / f"eval-steps{n}.json", "--model", d / f"steps{n}", "--tasks", "none"),
                        d / f"eval-steps{n}.json", [f"train-steps{n}"]))
        jobs.append(Job(f"shortgpt-steps{n}", lambda n=n: shortgpt_cmd(n), d / f"shortgpt-steps{n}.json", [f"train-steps{n}"]))
    failed = set() if a.report_only else run_jobs(jobs, a.jobs, d / "logs")

    points = []
    for n in steps:
        files = [d / f"steps{n}" / "summary.json", d / f"eval-steps{n}.json", d / f"shortgpt-steps{n}.json"]
        if all(f.exists() for f in files):
            run, ev, short = map(read, files)
            t = read(d / f"steps{n}" / "config.json")["settings"]  # the run's own tokens per step
            tokens = n * t["batch_size"] * t["block_size"] * t["gradient_accumulation_steps"]
            points.append({"steps": n, "tokens": tokens, "run": run, "eval": ev, "shortgpt": short,
                           "train_seconds": wall_seconds(d / f"steps{n}")})
    if not points or not (d / "dense.json").exists():
        raise UserError(f"no finished point of the learning curve in {d} yet; run python experiments.py curve")
    dense = read(d / "dense.json")
    lines = ["| steps | training tokens | training time | block params skipped (held-out) | held-out ppl: routed | "
             "routed / dense | ShortGPT at that sparsity | ShortGPT / routed | LAMBADA: routed | LAMBADA: ShortGPT | "
             "plays: routed | factual answers kept |", "|" + "---|" * 12]
    for p in points:
        r, ev, sh = p["run"], p["eval"], p["shortgpt"]
        p["ratio"] = r["val_ppl_routed"] / r["val_ppl_dense"]
        p["shortgpt_ratio"] = r["val_ppl_shortgpt"] / r["val_ppl_dense"]
        lines.append(f"| {p['steps']} | {p['tokens']:,} | {p['train_seconds'] / 60:.0f} min | {r['val_param_sparsity']:.3f} | "
                     f"{r['val_ppl_routed']:.1f} | {p['ratio']:.2f}x | {r['shortgpt_blocks']} blocks: {r['val_ppl_shortgpt']:.1f} | "
                     f"{r['val_ppl_shortgpt'] / r['val_ppl_routed']:.2f}x | {ev['ppl']['lambada']:.1f} | "
                     f"{sh['ppl']['lambada']:.1f} | {ev['ppl']['shakespeare']:.1f} | {ev['knowledge']:.0%} |")
    lines.append(f"| dense | | | 0 | {points[0]['run']['val_ppl_dense']:.1f} | 1.00x | | | {dense['ppl']['lambada']:.1f} | | "
                 f"{dense['ppl']['shakespeare']:.1f} | 100% |")
    fit = None
    if len(points) >= 3:  # routed / dense - 1 = c * tokens^-b, least squares in log-log
        x = np.log([p["tokens"] for p in points])
        y = np.log([p["ratio"] - 1 for p in points])
        slope, intercept = np.polyfit(x, y, 1)
        predict = lambda tokens: 1 + math.exp(intercept + slope * math.log(tokens))  # noqa: E731
        fit = {"exponent": -slope, "coefficient": math.exp(intercept), "paper_tokens": CURVE_PAPER_TOKENS, "ratio_at_paper_tokens": predict(CURVE_PAPER_TOKENS),
               "tokens_for_1.5x": math.exp((math.log(0.5) - intercept) / slope) if slope < 0 else None,
               "tokens_per_step": points[-1]["tokens"] / points[-1]["steps"]}
        lines.append(f"\nFit (an extrapolation, not a measurement): routed / dense - 1 ~ tokens^{slope:.3f} over "
                     f"{len(points)} points; at the paper's {CURVE_PAPER_TOKENS / 1e6:.0f}M tokens it predicts "
                     f"{fit['ratio_at_paper_tokens']:.2f}x dense" + (f"; 1.5x at {fit['tokens_for_1.5x'] / 1e6:.2f}M tokens "
                     f"({fit['tokens_for_1.5x'] / fit['tokens_per_step']:,.0f} steps of the runs' size)" if fit["tokens_for_1.5x"] else "") + ".")
    lines.append(f"\nHeld-out general text: {points[0]['run']['val_ppl_dense']:.1f} dense perplexity; every run's own "
                 f"calibrated offset; ShortGPT removes the lowest-Block-Influence blocks. LAMBADA and the plays: eval.py "
                 f"--tasks none. Factual answers kept: tasks.KNOWLEDGE's prompts answered as dense answers them.")
    figure = Path("docs/learning_curve.png") if a.out_dir is None else d / "learning_curve.png"
    plot_curve(points, fit, figure)
    summary = {"points": [{"steps": p["steps"], "tokens": p["tokens"], "train_seconds": p["train_seconds"],
                           "param_sparsity": p["run"]["val_param_sparsity"], "ppl_routed": p["run"]["val_ppl_routed"],
                           "ppl_dense": p["run"]["val_ppl_dense"], "ratio": p["ratio"],
                           "shortgpt_blocks": p["run"]["shortgpt_blocks"], "ppl_shortgpt": p["run"]["val_ppl_shortgpt"],
                           "lambada_routed": p["eval"]["ppl"]["lambada"], "lambada_shortgpt": p["shortgpt"]["ppl"]["lambada"],
                           "plays_routed": p["eval"]["ppl"]["shakespeare"], "knowledge": p["eval"]["knowledge"]}
                          for p in points],
               "fit": fit, "missing": [n for n in steps if n not in {p["steps"] for p in points}], "failed": sorted(failed)}
    write_study(d, "learning_curve", "\n".join(lines), summary, figure)


def wall_seconds(run_dir):
    """A run's training wall time over all its sessions, from log.jsonl: each step logs the seconds since
    its process's loop began (periodic validation included), so the time restarts where the run resumed."""
    rows = map(json.loads, (Path(run_dir) / "log.jsonl").read_text().splitlines())
    times = [r["time"] for r in rows if r["kind"] == "train"]
    return sum(t for t, after in zip(times, times[1:] + [0.0]) if after < t)  # each session's last time


def plot_curve(points, fit, path):
    import plots  # noqa: F401  (Agg backend)
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tokens = [p["tokens"] for p in points]
    a.plot(tokens, [p["ratio"] for p in points], "o-", label="SkipGPT routed (25% of block parameters)")
    a.plot(tokens, [p["shortgpt_ratio"] for p in points], "^--", label="ShortGPT at the same sparsity")
    a.axhline(1.0, color="k", lw=0.8, label="dense")
    if fit is not None:
        xs = np.geomspace(tokens[0], tokens[-1] * 8, 50)
        a.plot(xs, [1 + fit["coefficient"] * x ** -fit["exponent"] for x in xs], ":", color="gray",
               label=f"power-law fit (extrapolated beyond {tokens[-1]:,}; at the paper's "
                     f"{fit['paper_tokens'] / 1e6:.0f}M tokens: {fit['ratio_at_paper_tokens']:.2f}x)")
    a.set_xscale("log"), a.set_xlabel("stage-1 training tokens (log)"), a.set_ylabel("held-out perplexity / dense")
    b.plot(tokens, [100 * p["eval"]["knowledge"] for p in points], "o-", label="SkipGPT routed")
    b.plot(tokens, [100 * p["shortgpt"]["knowledge"] for p in points], "^--", label="ShortGPT at the same sparsity")
    b.set_xscale("log"), b.set_xlabel("stage-1 training tokens (log)"), b.set_ylabel("factual answers kept (%)")
    b.set_ylim(0, 100), b.legend(fontsize=7)
    per_step = points[0]["tokens"] / points[0]["steps"]
    for ax in (a, b):  # the whole planned range, so that a partial curve shows what is still to come
        ax.grid(alpha=0.3, which="both"), ax.set_xlim(min(CURVE_STEPS) * per_step / 1.5, max(CURVE_STEPS) * per_step * 1.5)
    ratios = [r for p in points for r in (p["ratio"], p["shortgpt_ratio"])]
    low, top = min(0.9, min(ratios) - 0.05), max(1.0, max(ratios))
    a.set_ylim(low, low + (top - low) * 1.6), a.legend(fontsize=7, loc="upper right")  # room above the lines for the legend
    fig.suptitle("SmolLM2-135M, stage 1 at 25%: the gap to dense against training tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The ablation study

ABLATIONS = [  # (row, what it tests, train_stage1.py flags; None: stage 2 on the default row's routers)
    ("default", "this project's defaults", []),
    ("router-mlp", "router: MLP dim -> dim/4 -> 2 (the authors' code) instead of linear", ["--router_kind", "mlp"]),
    ("mlp_input-post_attn", "MLP router reads the post-attention state instead of the block input", ["--mlp_input", "post_attn"]),
    ("weighting-modules", "sparsity counted in modules (the paper) instead of block parameters", ["--weighting", "modules"]),
    ("budget-per_layer", "a budget per block (Mixture-of-Depths-like) instead of one global budget", ["--budget", "per_layer"]),
    ("kv-evict", "a token that skips attention leaves no K/V (evict) instead of keeping them", ["--kv", "evict"]),
    ("joint", "one stage: LoRA r 16 trained together with the routers", ["--joint_lora_r", "16"]),
    ("two-stage", "the method's two stages: the default routers, then LoRA r 16 with the routers frozen", None),
    ("alpha-32", "sparsity loss weight alpha 32 (default 8)", ["--alpha", "32"]),
]


def study_ablations(a):
    d = Path(a.out_dir or ("out/ablations-quick" if a.quick else "out/ablations"))
    quick_both = QUICK_TRAIN if a.quick else []                        # stage 1 and stage 2 runs
    quick_stage1 = quick_both + (QUICK_STAGE1 if a.quick else [])
    # the default row always runs: every row is compared with it (and the two-stage row starts from it)
    chosen = [r for r in ABLATIONS if r[0] in a.rows or r[0] == "default"]
    seeds = range(a.seeds)

    def run_dir(row, k):
        return d / row / f"seed{k}"
    train = []  # seed-major: every row gets its k-th seed before any row gets its (k+1)-th
    for k in seeds:
        for row, _, flags in chosen:
            seed = ["--seed", str(FIRST_SEED + k)]
            if flags is None:
                cmd = [PY, "train_stage2.py", "--init_from", str(run_dir("default", k)), "--out_dir", str(run_dir(row, k)),
                       "--threads", "1", *seed, *quick_both]
            else:
                cmd = [PY, "train_stage1.py", "--out_dir", str(run_dir(row, k)), "--threads", "1", *seed, *quick_stage1, *flags]
            train.append(Job(f"train-{row}-seed{k}", cmd, run_dir(row, k) / "summary.json",
                             [f"train-default-seed{k}"] if flags is None else []))
    failed = run_jobs(train, a.jobs, d / "logs")
    summaries = {}  # row -> [summary of every seed that finished]
    for row, _, _ in chosen:
        done = [row_summary(read(run_dir(row, k) / "summary.json")) for k in seeds if (run_dir(row, k) / "summary.json").exists()]
        if done:
            summaries[row] = done
    if "default" not in summaries:
        raise UserError(f"the default row failed; see {d / 'logs'}")

    # -- zero-shot where it can show something (first seed): the default, the rows with LoRA (fine-tuning
    #    moves task quality in ways perplexity need not show), and rows far from the default
    ref = mean([s["val_ppl_routed"] for s in summaries["default"]])
    zero_shot = [row for row, ss in summaries.items() if not a.quick and a.zero_shot and
                 (row in ("default", "joint", "two-stage")
                  or max(ss[0]["val_ppl_routed"] / ref, ref / ss[0]["val_ppl_routed"]) > ZERO_SHOT_PPL_RATIO)]
    evals = [Job(f"eval-{row}", eval_cmd(d / f"eval-{row}.json", "--model", run_dir(row, 0)), d / f"eval-{row}.json")
             for row in zero_shot if (run_dir(row, 0) / "summary.json").exists()]
    if a.rerun_evals:
        for j in evals:
            j.output.unlink(missing_ok=True)
    failed |= run_jobs(evals, a.jobs, d / "logs")

    # -- speed on held-out text, each row's first finished run with its own routing on the fast path
    #    (not in the quick form: a row's speed follows its sparsity, which the full study measures)
    speeds = None
    if not a.quick:
        print(f"measuring speed (prefill of 512 held-out general tokens, 2 threads, interleaved, median of {SPEED_REPEATS}) ...")
        models = {"dense": timed_model(assets.DEFAULT_MODEL_DIR)}
        text = val_windows(load_split("data/general", "val", models["dense"][0].tokenizer), n=1, block=512)[:, :512]
        models |= {row: timed_model(next(run_dir(row, k) for k in seeds if (run_dir(row, k) / "summary.json").exists()))
                   for row in summaries}
        speeds = bench.prefill_speedups(models, text, repeats=SPEED_REPEATS)

    # -- table and figure
    zs = {job.name.removeprefix("eval-"): read(job.output) for job in evals if job.output.exists()}
    rows = ablation_rows(summaries)
    lines = ["| row | what changes | param sparsity | attn / MLP skip | val ppl: mean (range) | x default | beyond the seed spread | "
             "zero-shot avg | LAMBADA ppl | prefill speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row, what, _ in chosen:
        if row not in summaries:
            lines.append(f"| {row} | {what} | (failed: see {d / 'logs'}) |")
            continue
        r = rows[row]
        zero_shot_avg, lambada = (f"{zs[row]['avg_acc']:.3f}", f"{zs[row]['ppl']['lambada']:.1f}") if row in zs else ("-", "-")
        lines.append(f"| {row} | {what} | {r['sparsity']:.3f} | {r['attn_skip']:.2f} / {r['mlp_skip']:.2f} | "
                     f"{r['ppl']:.1f} ({r['lo']:.1f}-{r['hi']:.1f}, {r['n']} seed{'s' if r['n'] > 1 else ''}) | "
                     + f"{r['ppl'] / ref:.2f} | {r['beyond']} | "
                     + f"{zero_shot_avg} | {lambada} | {f'{speeds[row][1]:.2f}x' if speeds else '-'} |")
    dense_ppl = next(iter(summaries.values()))[0]["val_ppl_dense"]
    dense_speed = f", prefill {speeds['dense'][0]:.0f} tokens/s" if speeds else ""
    lines.append(f"\nDense: val ppl {dense_ppl:.1f}{dense_speed}. "
                 f"{'Quick form (' + ' '.join(QUICK_TRAIN + QUICK_STAGE1) + '): no zero-shot, no speed. ' if a.quick else ''}"
                 + (f"Seed {FIRST_SEED}. " if a.seeds == 1 else f"Seeds {FIRST_SEED}-{FIRST_SEED + a.seeds - 1}; ")
                 + "\"beyond the seed spread\": the row's range of perplexities and the default row's do not overlap."
                 + ("" if a.quick or not a.zero_shot else f" Zero-shot and LAMBADA (default subsets, the first seed's run, its own offset) "
                                      f"for the default, joint and two-stage rows and where the perplexity differs from "
                                      f"the default row's by more than {ZERO_SHOT_PPL_RATIO}x."))
    full = Path(a.full_dir) / "ablations.json"
    agreement = None
    if a.quick and full.exists():  # the quick form beside the full study: does it rank the rows alike?
        agreement = compare_rankings(rows, read(full)["rows"])
        lines.append("\n" + agreement.pop("table"))
    elif a.quick:
        lines.append(f"\n(No full study in {a.full_dir} to rank against: python experiments.py ablations)")
    table = "\n".join(lines)
    plot_ablations(rows, speeds, ref, d / "ablations.png", a.quick)
    summary = {"rows": {row: rows[row] | {"prefill_speedup": speeds[row][1] if speeds else None,
                                          "zero_shot_avg": zs[row]["avg_acc"] if row in zs else None}
                        for row in summaries}, "quick": a.quick, "seeds": a.seeds, "agreement": agreement,
               "failed": sorted(failed)}
    write_study(d, "ablations", table, summary, d / "ablations.png")


def ablation_rows(summaries):
    """Per row: the mean over its seeds of perplexity and sparsity, the perplexities' range, and
    whether that range and the default row's are apart (a difference larger than the seed spread)."""
    rows = {}
    for row, ss in summaries.items():
        ppl = [s["val_ppl_routed"] for s in ss]
        rows[row] = {"ppl": mean(ppl), "lo": min(ppl), "hi": max(ppl), "n": len(ss), "ppls": ppl,
                     **{k: mean([s[v] for s in ss]) for k, v in (("sparsity", "val_param_sparsity"),
                                                                 ("attn_skip", "val_attn_skip"), ("mlp_skip", "val_mlp_skip"))}}
    lo, hi = rows["default"]["lo"], rows["default"]["hi"]
    for row, r in rows.items():
        r["beyond"] = "-" if row == "default" else (
            "n/a (one seed)" if r["n"] < 2 or rows["default"]["n"] < 2 else
            "yes, better" if r["hi"] < lo else "yes, worse" if r["lo"] > hi else "no")
    return rows


def spearman(x, y):
    """Spearman's rank correlation of two equally long lists: the Pearson correlation of their ranks
    (0-based, ties sharing their average rank)."""
    def ranks(v):
        return [sum(w < u for w in v) + (sum(w == u for w in v) - 1) / 2 for u in v]
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def compare_rankings(quick, full):
    """The quick form's rows against the full study's: both rankings by perplexity, Spearman's rank
    correlation over the rows both have, and every row whose difference from the default has the
    opposite sign in the two forms while the full study's difference is larger than its seed spread
    (its "beyond" column). -> {"spearman", "rows", "sign_flips", "table"}."""
    common = [r for r in full if r in quick]
    rho = spearman([quick[r]["ppl"] for r in common], [full[r]["ppl"] for r in common])
    flips = [r for r in common if r != "default" and full[r]["beyond"].startswith("yes")
             and (quick[r]["ppl"] - quick["default"]["ppl"]) * (full[r]["ppl"] - full["default"]["ppl"]) < 0]
    by = {form: sorted(common, key=lambda r: rows[r]["ppl"]) for form, rows in (("quick", quick), ("full", full))}
    lines = ["| rank | quick form: row (ppl) | full study: row (ppl, seeds) |", "|---|---|---|"]
    for i, (q, f) in enumerate(zip(by["quick"], by["full"])):
        lines.append(f"| {i + 1} | {q} ({quick[q]['ppl']:.1f}) | {f} ({full[f]['ppl']:.1f}, {full[f]['n']}) |")
    lines.append(f"\nSpearman rank correlation over {len(common)} rows: {rho:.2f} (target >= 0.8). Rows whose "
                 f"difference from the default flips sign while the full study's is beyond its seed spread: "
                 f"{', '.join(flips) or 'none'}" + ("" if any(full[r]["n"] > 1 for r in common)
                                                    else " (the full study has one seed: no spread known)") + ".")
    return {"spearman": rho, "rows": common, "sign_flips": flips, "table": "\n".join(lines)}


def row_summary(s):
    """The fields of a stage-1 or a stage-2 summary.json that an ablation row shows."""
    if "val_ppl_stage2" in s:
        return {"val_ppl_routed": s["val_ppl_stage2"], "val_ppl_dense": s["val_ppl_dense"], "val_param_sparsity": s["val_sparsity"],
                "val_attn_skip": s["val_attn_skip"], "val_mlp_skip": s["val_mlp_skip"]}
    return s


def plot_ablations(rows, speeds, ref, path, quick):
    import plots  # noqa: F401
    import matplotlib.pyplot as plt
    names = list(rows)
    panels = [("val perplexity, held-out general text (mean, range over seeds)", [rows[r]["ppl"] for r in names]),
              ("param sparsity (val, mean)", [rows[r]["sparsity"] for r in names])]
    if speeds:
        panels.append(("prefill-512 speedup vs dense", [speeds[r][1] for r in names]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4), sharey=True)
    y = range(len(names))
    colors = ["C1" if r == "default" else "C0" for r in names]
    ppl = [rows[r]["ppl"] for r in names]
    err = [[rows[r]["ppl"] - rows[r]["lo"] for r in names], [rows[r]["hi"] - rows[r]["ppl"] for r in names]]
    axes[0].barh(y, ppl, xerr=err, color=colors, capsize=3)
    for ax, (_, values) in zip(axes[1:], panels[1:]):
        ax.barh(y, values, color=colors)
    for k, (ax, (xlabel, values)) in enumerate(zip(axes, panels)):
        for i, (r, v) in enumerate(zip(names, values)):  # the perplexity's label after its error bar
            ax.text(rows[r]["hi"] if k == 0 else v, i, f" {v:.3g}", va="center", fontsize=8)
        ax.set_xlabel(xlabel), ax.grid(alpha=0.3, axis="x")
    axes[0].axvline(ref, color="C1", lw=0.8)
    if speeds:
        axes[2].axvline(1.0, color="black", lw=0.8)
    axes[0].set_yticks(list(y), names), axes[0].invert_yaxis()
    form = "quick form: " + " ".join(QUICK_TRAIN + QUICK_STAGE1) if quick else "train_stage1.py's defaults"
    fig.suptitle(f"SkipGPT stage-1 ablations on SmolLM2-135M ({form}, target 25%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("study", choices=["results", "headline", "ablations", "curve"])
    p.add_argument("--quick", action="store_true", help="ablations: the classroom form (" + " ".join(QUICK_TRAIN + QUICK_STAGE1) + "; no zero-shot, no speed)")
    p.add_argument("--rows", nargs="+", default=[r[0] for r in ABLATIONS],
                   help="ablations: only these rows (and the default row, always): "
                        + " ".join(r[0] for r in ABLATIONS))
    p.add_argument("--seeds", type=int, default=None,
                   help="ablations: training seeds per row; headline: SkipGPT's seeds (default 3; quick form and --stage1_iters: 1)")
    p.add_argument("--stage1_iters", type=int, default=None,
                   help="headline: stage 1 this many steps (default: train_stage1.py's), the study in runs/headline-stepsN")
    p.add_argument("--jobs", type=int, default=2, help="jobs at a time, one CPU thread each")
    p.add_argument("--limit", type=int, default=HEADLINE_LIMIT,
                   help=f"headline: the first N documents of every task, HellaSwag included (default {HEADLINE_LIMIT})")
    p.add_argument("--out_dir", default=None, help="where results, logs and figures go")
    p.add_argument("--zero_shot", type=parse_bool, default=True,
                   help="ablations: zero-shot evaluations of the rows that get them (false: perplexity and speed only)")
    p.add_argument("--full_dir", default="out/ablations", help="ablations --quick: the full study to rank the quick form against")
    p.add_argument("--rerun_evals", action="store_true", help="evaluate again even where results exist")
    p.add_argument("--max_steps", type=int, default=None, help="curve: only the points up to this many steps")
    p.add_argument("--report_only", action="store_true", help="curve: train nothing, report the finished points")
    a = p.parse_args(argv)
    if a.limit < 1:
        raise UserError("--limit must be >= 1")
    if a.jobs < 1:
        raise UserError("--jobs must be >= 1")
    if a.quick and a.study != "ablations":
        raise UserError("--quick is a form of the ablation study: python experiments.py ablations --quick")
    unknown = [r for r in a.rows if r not in [row for row, _, _ in ABLATIONS]]
    if unknown:
        raise UserError(f"unknown ablation row(s) {', '.join(unknown)}; choose from {', '.join(r[0] for r in ABLATIONS)}")
    if a.stage1_iters is not None and (a.study != "headline" or a.stage1_iters < 1):
        raise UserError("--stage1_iters N (N >= 1) is a form of the headline: python experiments.py headline --stage1_iters 1600")
    a.seeds = a.seeds if a.seeds is not None else (1 if a.quick or a.stage1_iters else 3)
    if a.seeds < 1:
        raise UserError("--seeds must be >= 1")
    return a


def main(argv=None):
    a = parse_args(argv)
    {"results": study_results, "headline": study_headline, "ablations": study_ablations, "curve": study_curve}[a.study](a)


if __name__ == "__main__":
    cli(main)

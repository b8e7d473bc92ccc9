"""Training benchmark: our script against Stanford Alpaca's train.py, on CPU.

Same tiny LLaMA (alpaca_train.testing), same data (the Alpaca seed tasks replicated):

1. Preprocessing 52,000 records: the reference's SupervisedDataset against ours
   (load, prompts, tokenization, labels), best of --repeats; the labels must be identical.
2. Training throughput in non-padding tokens per second (the Trainer's own count of
   non-padding input tokens, over the wall time of the steps after the first
   WARMUP_STEPS, timed by the same callback in both scripts): the reference's train.py
   against ours with the same batches, with length grouping, and with packing (ours and
   transformers' DataCollatorWithFlattening).
3. Full fine-tuning against LoRA (ours, the same batches): tokens/s, the process's peak RSS
   and the size of one checkpoint, in --lora-rounds paired rounds; no target.

    .venv/bin/python bench/bench_train.py [--write-docs] [--repeats 2] [--rounds 5] [--lora-rounds 5] [--steps 300]
    .venv/bin/python bench/bench_train.py --only lora --lora-rounds 1 --steps 20   # a trial of one part

--write-docs replaces the generated part of docs/benchmarks.md's Training section (between
the markers BEGIN and END) with what this run measured, and leaves the rest of the file,
the hand-kept history of earlier runs included, as it is. With --only it writes the parts that
ran and says which did not.

Exits non-zero when a target is missed: preprocessing at least 5x with identical labels,
and, as medians of at least 5 paired rounds, same batches at least 1.0x and packing 1.5x.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

SEED_TASKS = ROOT / "tests" / "data" / "alpaca_seed_tasks.jsonl"
DOCS = ROOT / "docs" / "benchmarks.md"


def replicated(records: list[dict], n: int) -> list[dict]:
    return (records * (n // len(records) + 1))[:n]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import peft
        versions += f", peft {peft.__version__}"
    except ImportError:  # before the LoRA support: the LoRA part then fails on its own
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {versions}"


def bench_preprocessing(model_dir: Path, records: list[dict], repeats: int, workdir: Path) -> dict:
    import alpaca_reference as ref
    from transformers import AutoTokenizer

    from alpaca_train import data

    path = workdir / "alpaca_data_52k.json"
    path.write_text(json.dumps(records))
    tok = AutoTokenizer.from_pretrained(model_dir, model_max_length=512, padding_side="right")
    tok.add_special_tokens({"pad_token": data.DEFAULT_PAD_TOKEN})
    times = {"reference": [], "ours": []}
    ref_ds = ours = None
    for _ in range(repeats):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        ref_ds = ref.SupervisedDataset(str(path), tok)
        times["reference"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = data.SupervisedDataset.from_records(data.load_records(path), tok, 512)
        times["ours"].append(time.perf_counter() - t0)
    identical = len(ours) == len(ref_ds) and all(
        ours.example(i).tolist() == ref_ds.input_ids[i].tolist() and ours.labels(i) == ref_ds.labels[i].tolist()
        for i in range(len(ref_ds))
    )
    best = {k: min(v) for k, v in times.items()}
    return {"records": len(records), "tokens": ours.num_tokens, "seconds": best, "all_seconds": times,
            "speedup": best["reference"] / best["ours"], "identical_labels": identical}


# Both scripts run under the same instrumentation: a callback that notes the time and the
# Trainer's non-padding token count at the end of every step. Throughput is taken after
# WARMUP_STEPS, so the data loader's start and the first steps' allocations (a large,
# noisy share of a short run on 2 cores) count for neither.
STEP_CLOCK = f"""
import json, os, sys, time
import transformers
sys.path.insert(0, {str(ROOT / "bench")!r})

class StepClock(transformers.TrainerCallback):
    ticks = []
    def on_step_end(self, args, state, control, **kwargs):
        self.ticks.append((time.perf_counter(), state.num_input_tokens_seen))
    def on_train_end(self, args, state, control, **kwargs):
        with open(os.environ["BENCH_STEP_CLOCK"], "w") as f:
            json.dump(self.ticks, f)

init = transformers.Trainer.__init__
def with_clock(self, *a, **k):
    init(self, *a, **k)
    self.add_callback(StepClock())
transformers.Trainer.__init__ = with_clock
"""

# The command line cannot ask the reference for the non-padding token count
# ("non_padding" parses as a bool), so it is set here; ours counts them by default.
REFERENCE_MAIN = STEP_CLOCK + """
import alpaca_reference as ref
post_init = ref.TrainingArguments.__post_init__
def counting(self):
    self.include_num_input_tokens_seen = "non_padding"
    post_init(self)
ref.TrainingArguments.__post_init__ = counting
ref.train()
"""
OURS_MAIN = STEP_CLOCK + """
from alpaca_train.train import main
sys.exit(main())
"""
WARMUP_STEPS = 10
BATCH_SIZE = 4

REFERENCE = "reference (Stanford Alpaca train.py)"
SAME = "ours, same batches"
PACKING = "ours, --packing"
FLATTENING = "ours, --packing --collator transformers"
TRAIN_CONFIGS = {
    REFERENCE: ("reference", []),
    SAME: ("ours", []),
    "ours, --group_by_length": ("ours", ["--group_by_length", "True"]),
    PACKING: ("ours", ["--packing", "True"]),
    # transformers' DataCollatorWithFlattening: the whole micro-batch as one row.
    FLATTENING: ("ours", ["--packing", "True", "--collator", "transformers"]),
}
# Medians of the paired per-round ratios against the reference (docs/benchmarks.md).
TARGETS = {SAME: 1.0, PACKING: 1.5}
PREPROCESSING_TARGET = 5.0
MIN_ROUNDS = 5

# Full fine-tuning against LoRA (issue 17): ours with the same batches either way, LoRA on
# every linear projection of the attention and MLP blocks (the spec's default), each run
# saving one checkpoint after its last timed step. No target: the issue asks for the
# figures and their ratios only.
FULL = "full fine-tuning"
LORA = "LoRA"
LORA_FLAGS = ["--peft", "lora", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05",
              "--lora_target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
              "--merge_lora", "true"]
LORA_CONFIGS = {FULL: [], LORA: LORA_FLAGS}
LORA_MEASURES = ("tokens_per_second", "peak_rss_bytes", "checkpoint_bytes")

# Others' published GPU figures, printed beside ours for scale: copied from their sources as
# published, not measured by this script (tests/test_bench_docs.py keeps them apart from the
# figures a run writes).
PUBLISHED = [
    {"source": "NVIDIA NeMo Framework User Guide 24.09, Performance, fine-tuning table",
     "url": "https://docs.nvidia.com/nemo-framework/user-guide/24.09/performance/performance_summary.html",
     "setup": "Llama-2-7B on 8 H100s (DGX-H100, NeMo 24.07 container), FP8, SQuAD packed to 4096 tokens",
     "unit": "tokens/s per GPU", "lora": 24824, "full": 16891, "memory": None},
    {"source": "torchtune README, \"Memory and training speed\"",
     "url": "https://github.com/pytorch/torchtune/blob/0031bfb080bd35ec533c412df883cf2bf7bf7fe4/README.md",
     "setup": "Llama-3.1-8B on one A6000, batch 2 packed to 2048 tokens, torch.compile, one epoch",
     "unit": "tokens/s", "lora": 4699, "full": 2579, "memory": ("peak GPU memory", "30.3 GiB", "37.4 GiB", 30.3 / 37.4)},
]


def train_once(kind: str, extra: list[str], model_dir: Path, data_path: Path, steps: int, out: Path, env: dict,
               save: bool = False) -> dict:
    common = ["--model_name_or_path", str(model_dir), "--data_path", str(data_path), "--output_dir", str(out),
              "--max_steps", str(steps), "--per_device_train_batch_size", str(BATCH_SIZE), "--learning_rate", "2e-5",
              "--logging_steps", str(steps), "--report_to", "none", "--seed", "42"]
    # One checkpoint, at the last step: the Trainer saves it after that step's on_step_end,
    # so it falls outside the timed steps (STEP_CLOCK), and none lands between them.
    common += ["--save_strategy", "steps", "--save_steps", str(steps)] if save else ["--save_strategy", "no"]
    main = REFERENCE_MAIN if kind == "reference" else OURS_MAIN
    cmd = [sys.executable, "-c", main, *common, *([] if kind == "reference" else extra)]
    clock = out / "step_clock.json"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stdout.txt", "w") as so, open(out / "stderr.txt", "w") as se:
        proc = subprocess.Popen(cmd, env=dict(env, BENCH_STEP_CLOCK=str(clock)), stdout=so, stderr=se)
        # wait4 rather than wait: it gives this child's own peak RSS (RUSAGE_CHILDREN would be
        # the largest of every run so far). Linux reports ru_maxrss in KiB.
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (out / "stdout.txt").read_text()[-2000:] + "\n" + (out / "stderr.txt").read_text()[-4000:]
        raise RuntimeError(f"{' '.join(cmd[:2])} ... {' '.join(cmd[3:])} failed:\n{tail}")
    ticks = json.loads(clock.read_text())
    if len(ticks) != steps:
        raise RuntimeError(f"{kind}: {len(ticks)} steps timed, {steps} asked for")
    (t0, n0), (t1, n1) = ticks[WARMUP_STEPS - 1], ticks[-1]
    result = {"tokens": n1 - n0, "seconds": t1 - t0, "tokens_per_second": (n1 - n0) / (t1 - t0),
              "peak_rss_bytes": usage.ru_maxrss * 1024}
    if save:
        checkpoint = out / f"checkpoint-{steps}"
        if not checkpoint.is_dir():
            raise RuntimeError(f"{kind} {' '.join(extra)}: no {checkpoint.name} in {out}")
        result["checkpoint_bytes"] = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    return result


def training_env() -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("ALPACA_FINETUNE_NAME", None)
    return env


def write_data(records: list[dict], workdir: Path) -> Path:
    path = workdir / "alpaca_data_train.json"
    path.write_text(json.dumps(records))
    return path


def slug(name: str) -> str:
    return re.sub(r"[^a-z]+", "-", name.lower())


def bench_training(model_dir: Path, records: list[dict], steps: int, repeats: int, workdir: Path) -> dict:
    data_path = write_data(records, workdir)
    env = training_env()
    names = list(TRAIN_CONFIGS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        # Each round runs every configuration back to back, in a rotated order, so that
        # the load of a shared machine hits them alike; ratios are taken within a round.
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            kind, extra = TRAIN_CONFIGS[name]
            out = workdir / f"run-{r}-{slug(name)}"
            runs[name].append(train_once(kind, extra, model_dir, data_path, steps, out, env))
            print(f"  round {r + 1}: {name}: {runs[name][-1]['tokens_per_second']:.0f} tokens/s", flush=True)
        base = runs[names[0]][-1]["tokens_per_second"]
        for name in names:
            ratios[name].append(runs[name][-1]["tokens_per_second"] / base)
    median_tps = {name: statistics.median(x["tokens_per_second"] for x in rs) for name, rs in runs.items()}
    # Ours against transformers' flattening collator, both packing: which one is the faster
    # here is what the docs say about --packing's default, so it is paired too.
    packing_vs_flattening = [p["tokens_per_second"] / f["tokens_per_second"]
                             for p, f in zip(runs[PACKING], runs[FLATTENING])]
    return {"steps": steps, "rounds": repeats, "records": len(records), "batch_size": BATCH_SIZE,
            "warmup_steps": WARMUP_STEPS, "runs": runs, "median_tokens_per_second": median_tps,
            "median_round_ratio": {name: statistics.median(v) for name, v in ratios.items()},
            "round_ratios": ratios, "packing_vs_flattening": packing_vs_flattening}


def bench_lora(model_dir: Path, records: list[dict], steps: int, rounds: int, workdir: Path) -> dict:
    data_path = write_data(records, workdir)
    env = training_env()
    names = list(LORA_CONFIGS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        # Paired like the throughput rounds: both back to back, the order alternating.
        for name in (names if r % 2 == 0 else names[::-1]):
            out = workdir / f"lora-{r}-{slug(name)}"
            runs[name].append(train_once("ours", LORA_CONFIGS[name], model_dir, data_path, steps, out, env, save=True))
            got = runs[name][-1]
            print(f"  LoRA round {r + 1}: {name}: {got['tokens_per_second']:.0f} tokens/s, "
                  f"{got['peak_rss_bytes'] / 2**20:.1f} MiB peak RSS, {got['checkpoint_bytes']:,} bytes checkpoint",
                  flush=True)
    ratios = {m: [lo[m] / full[m] for full, lo in zip(runs[FULL], runs[LORA])] for m in LORA_MEASURES}
    return {"steps": steps, "rounds": rounds, "records": len(records), "batch_size": BATCH_SIZE,
            "warmup_steps": WARMUP_STEPS, "flags": LORA_FLAGS, "runs": runs,
            "median": {name: {m: statistics.median(x[m] for x in rs) for m in LORA_MEASURES}
                       for name, rs in runs.items()},
            "ratios": ratios, "median_ratio": {m: statistics.median(v) for m, v in ratios.items()}}


def missed_targets(pre: dict | None, tr: dict | None) -> list[str]:
    missed = []
    if pre is not None:
        if not pre["identical_labels"]:
            missed.append("preprocessing: labels differ from the reference's")
        if pre["speedup"] < PREPROCESSING_TARGET:
            missed.append(f"preprocessing: {pre['speedup']:.2f}x < {target_text(PREPROCESSING_TARGET)}")
    if tr is not None:
        for name, target in TARGETS.items():
            got = tr["median_round_ratio"][name]
            if got < target:
                missed.append(f"{name}: median of paired ratios {got:.2f}x < {target_text(target)}")
    return missed


# --- docs/benchmarks.md -------------------------------------------------------------------
# The generator writes only between these markers, and only what the run it is given
# measured: every figure below comes from `results`, and every word that judges a figure
# (faster, met) is decided from it. Earlier runs are hand-kept below the end marker.
BEGIN = ("<!-- generated by `bench/bench_train.py --write-docs` from one run: do not edit down to the end "
         "marker; earlier runs go in the hand-kept history below it -->")
END = "<!-- end of the generated part -->"
SECTION = "## Training"


def target_text(target: float) -> str:
    return f"{target:.1f}x"


def ratio_word(ratio: float, more: str, less: str, same: str) -> str:
    # Judged on the figure as printed, so the word never contradicts the number beside it.
    shown = round(ratio, 2)
    return more if shown > 1 else less if shown < 1 else same


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}x to {max(values):.2f}x"


def published_table() -> list[str]:
    """Others' GPU figures (PUBLISHED): the only figures of the generated part not from `results`."""
    lines = ["| published, on GPUs | LoRA | full fine-tuning | LoRA / full | memory, LoRA against full |",
             "|---|---:|---:|---:|---|"]
    for p in PUBLISHED:
        memory = "" if p["memory"] is None else (
            f"{p['memory'][0]} {p['memory'][1]} against {p['memory'][2]} ({p['memory'][3]:.2f}x)")
        lines.append(f"| [{p['source']}]({p['url']}): {p['setup']} | {p['lora']:,} {p['unit']} | "
                     f"{p['full']:,} {p['unit']} | **{p['lora'] / p['full']:.2f}x** | {memory} |")
    return lines


def lora_command() -> str:
    return " ".join(LORA_FLAGS)


def render_preprocessing(pre: dict, setup: dict) -> list[str]:
    speed = pre["speedup"]
    return [
        f"### Preprocessing {pre['records']:,} records ({pre['tokens']:,} tokens), best of {setup['repeats']}",
        "",
        "| | seconds | speed-up |",
        "|---|---:|---:|",
        f"| reference (`SupervisedDataset`) | {pre['seconds']['reference']:.1f} | (the baseline) |",
        f"| ours (`load_records` + `SupervisedDataset.from_records`) | {pre['seconds']['ours']:.1f} | "
        f"**{speed:.1f}x** |",
        "",
        f"Labels identical to the reference's, token for token, on all {pre['records']:,} records: "
        f"**{'yes' if pre['identical_labels'] else 'NO'}**. Target: at least {target_text(PREPROCESSING_TARGET)} "
        f"({'met' if speed >= PREPROCESSING_TARGET else '**MISSED**'}). Each repeat, reference then ours, in "
        "seconds: " + "; ".join(f"{a:.1f} and {b:.1f}" for a, b in zip(pre["all_seconds"]["reference"],
                                                                    pre["all_seconds"]["ours"])) + ".",
        "",
    ]


def render_training(tr: dict) -> list[str]:
    lines = [
        f"### Training throughput, {tr['steps']} steps of {tr['batch_size']} examples (or {tr['batch_size']} "
        f"packs), {tr['rounds']} interleaved rounds",
        "",
        "Headline: the median over the rounds of each round's ratio to that round's reference run",
        "(the rounds run every configuration back to back, in a rotated order, so a load change",
        "hits a pair alike); beside it the spread of those ratios, lowest to highest.",
        "",
        "| | median of paired ratios | spread of the ratios | target | median non-padding tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in tr["median_tokens_per_second"].items():
        got = tr["median_round_ratio"][name]
        target = target_text(TARGETS[name]) if name in TARGETS else ""
        met = "" if name not in TARGETS else (" (met)" if got >= TARGETS[name] else " (**MISSED**)")
        lines.append(f"| {name} | **{got:.2f}x**{met} | {spread(tr['round_ratios'][name])} | {target} | {v:,.0f} |")
    pf = tr["packing_vs_flattening"]
    pf_median = statistics.median(pf)
    lines += [
        "",
        "Rounds, ratio to the reference: " + "; ".join(
            f"{name}: {', '.join(f'{x:.2f}' for x in tr['round_ratios'][name])}"
            for name in tr["round_ratios"] if name != REFERENCE) + ".",
        "",
        f"`--packing` with ours against `--collator transformers`, paired round by round: **{pf_median:.2f}x** "
        f"({spread(pf)}): ours was the "
        f"{ratio_word(pf_median, 'faster', 'slower', 'same speed')} of the two in this run.",
        "",
        "Tokens per second are the Trainer's count of non-padding input tokens over the wall time of steps",
        f"{tr['warmup_steps'] + 1} to {tr['steps']}, both scripts timed by the same callback (`STEP_CLOCK` in the",
        "benchmark), so start-up, the data loader's start and the first steps count for neither.",
        "",
    ]
    return lines


def render_lora(lo: dict) -> list[str]:
    med, ratio, ratios = lo["median"], lo["median_ratio"], lo["ratios"]
    rows = [("non-padding tokens/s", lambda x: f"{x:,.0f}", "tokens_per_second"),
            ("peak RSS of the training process", mib, "peak_rss_bytes"),
            (f"checkpoint (checkpoint-{lo['steps']}, all its files)", mib, "checkpoint_bytes")]
    lines = [
        f"### Full fine-tuning against LoRA, {lo['steps']} steps of {lo['batch_size']} examples, "
        f"{lo['rounds']} paired rounds",
        "",
        f"Ours with the same batches, once as it is and once with `{lora_command()}`;",
        "each round runs both back to back (the order alternating), and each run saves one checkpoint",
        "after its last timed step. Medians over the rounds; the ratio column is the median of each",
        "round's LoRA figure over its full fine-tuning figure.",
        "",
        f"| measured here, tiny model on CPU | {FULL} | {LORA} | LoRA / full (spread) |",
        "|---|---:|---:|---:|",
    ]
    for label, fmt, m in rows:
        lines.append(f"| {label} | {fmt(med[FULL][m])} | {fmt(med[LORA][m])} | **{ratio[m]:.2f}x** "
                     f"({spread(ratios[m])}) |")
    lines += [""] + published_table() + [
        "",
        f"In this run LoRA trained at {ratio['tokens_per_second']:.2f}x full fine-tuning's tokens/s "
        f"({ratio_word(ratio['tokens_per_second'], 'faster', 'slower', 'as fast')}), the published GPU figures at "
        + " and ".join(f"{p['lora'] / p['full']:.2f}x ({ratio_word(p['lora'] / p['full'], 'faster', 'slower', 'as fast')})"
                       for p in PUBLISHED)
        + f"; its process peaked at {ratio['peak_rss_bytes']:.2f}x full fine-tuning's RSS "
        f"({ratio_word(ratio['peak_rss_bytes'], 'more', 'less', 'the same')}) and its checkpoint was "
        f"{ratio['checkpoint_bytes']:.2f}x the size "
        f"({ratio_word(ratio['checkpoint_bytes'], 'larger', 'smaller', 'the same size')}).",
        "",
        f"Tokens/s are the Trainer's non-padding input tokens over the wall time of steps {lo['warmup_steps'] + 1} "
        f"to {lo['steps']} (`STEP_CLOCK`). Peak RSS is the whole process's (`ru_maxrss` from `wait4`):",
        "start-up, loading, training, saving and, for LoRA, merging the adapter into the model.",
        "",
    ]
    if lo["rounds"] < MIN_ROUNDS:
        lines += [f"Fewer rounds than the throughput table's minimum of {MIN_ROUNDS}: a smaller sample, "
                  "so a noisier median.", ""]
    return lines


def render(results: dict) -> str:
    """The generated part of the Training section, from one run's `results` alone."""
    setup = results["setup"]
    lines = [
        f"`.venv/bin/python bench/bench_train.py {results['arguments']}`, {results['when']}, "
        f"{results['minutes']:.0f} minutes.",
        f"Machine: {results['machine']}; load average {results['load_start']:.1f} at the start, "
        f"{results['load_end']:.1f} at the end (a shared machine). CPU only, one process, the tiny LLaMA of",
        f"`alpaca_train.testing` ({setup['layers']} layers, hidden {setup['hidden']}, a {setup['vocab']:,}-token "
        "LLaMA tokenizer trained on the seed tasks),",
        f"data: the {setup['seed_tasks']} Alpaca seed tasks replicated. Reference: Stanford Alpaca's train.py on",
        "the pinned transformers with only the renames it needs (`bench/alpaca_reference.py`).",
        "",
    ]
    pre, tr, lo = results.get("preprocessing"), results.get("training"), results.get("lora")
    skipped = [PART_TITLES[part] for part in PARTS if results.get(part) is None]
    if skipped:
        lines += [f"Not measured in this run (`--only`): {', '.join(skipped)}; their latest figures are in the "
                  "hand-kept history below.", ""]
    if pre is not None:
        lines += render_preprocessing(pre, setup)
    if tr is not None:
        lines += render_training(tr)
    if lo is not None:
        lines += render_lora(lo)
    missed = missed_targets(pre, tr)
    if pre is None and tr is None:
        lines.append("No target was judged in this run: the targets are on preprocessing and training throughput.")
    else:
        lines.append("**Targets missed in this run: " + "; ".join(missed) + ".** `make bench-train` exited non-zero."
                     if missed else "Every target was met in this run.")
    return "\n".join([BEGIN, *lines, END])


def write_docs(generated: str) -> None:
    """Replace the generated part of docs/benchmarks.md's Training section; keep the rest."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + generated + rest.split(END, 1)[1]
    elif re.search(rf"^{SECTION}$", text, re.M):
        # A Training section without markers holds hand-written text this must not overwrite.
        raise SystemExit(f"{DOCS}: its {SECTION!r} section has no generated part; put the two markers in "
                         f"(bench/bench_train.py, BEGIN and END) where the generated part goes")
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{generated}\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def model_setup(model_dir: Path, seed: list[dict], repeats: int) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    return {"layers": config["num_hidden_layers"], "hidden": config["hidden_size"], "vocab": config["vocab_size"],
            "seed_tasks": len(seed), "repeats": repeats}


PARTS = ("preprocessing", "training", "lora")
PART_TITLES = {"preprocessing": "preprocessing", "training": "training throughput",
               "lora": "full fine-tuning against LoRA"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=52000)
    p.add_argument("--train-records", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2, help="preprocessing repeats")
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="training rounds (every configuration once each)")
    p.add_argument("--lora-rounds", type=int, default=MIN_ROUNDS,
                   help="rounds of full fine-tuning against LoRA (the docs say so when fewer than the minimum)")
    p.add_argument("--only", action="append", choices=PARTS,
                   help="run this part alone (repeatable); with --write-docs the docs say which parts were not run")
    p.add_argument("--write-docs", action="store_true", help=f"write the generated part of {DOCS}'s Training section")
    args = p.parse_args(argv)
    parts = args.only or PARTS
    if args.write_docs and args.rounds < MIN_ROUNDS and "training" in parts:
        p.error(f"--rounds must be at least {MIN_ROUNDS} for --write-docs: a median of fewer paired rounds is not "
                "a measurement")
    if args.lora_rounds < 1 or args.rounds < 1:
        p.error("--rounds and --lora-rounds must be at least 1")
    if args.steps <= WARMUP_STEPS:
        p.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps, which are not timed")
    if args.rounds < MIN_ROUNDS and "training" in parts:
        print(f"trial: {args.rounds} rounds, fewer than the {MIN_ROUNDS} a result needs", flush=True)

    from alpaca_train import testing
    from alpaca_train.data import load_records

    started = time.monotonic()
    load_start = os.getloadavg()[0]
    model_dir = testing.build()
    seed = load_records(SEED_TASKS)
    results = {"when": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(), "load_start": load_start,
               "arguments": shlex.join(sys.argv[1:] if argv is None else argv),
               "setup": model_setup(model_dir, seed, args.repeats)}
    print(results["machine"], f"load average {load_start:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        if "preprocessing" in parts:
            print("preprocessing...", flush=True)
            pre = bench_preprocessing(model_dir, replicated(seed, args.records), args.repeats, tmp)
            results["preprocessing"] = pre
            print(json.dumps(pre, indent=1), flush=True)
        if "training" in parts:
            print("training...", flush=True)
            tr = bench_training(model_dir, replicated(seed, args.train_records), args.steps, args.rounds, tmp)
            results["training"] = tr
            print(json.dumps({k: tr[k] for k in ("median_tokens_per_second", "median_round_ratio", "round_ratios",
                                                 "packing_vs_flattening")}, indent=1), flush=True)
        if "lora" in parts:
            print("full fine-tuning against LoRA...", flush=True)
            lo = bench_lora(model_dir, replicated(seed, args.train_records), args.steps, args.lora_rounds, tmp)
            results["lora"] = lo
            print(json.dumps({k: lo[k] for k in ("median", "ratios", "median_ratio")}, indent=1), flush=True)
    results["load_end"] = os.getloadavg()[0]
    results["minutes"] = (time.monotonic() - started) / 60
    generated = render(results)
    print(generated)
    if args.write_docs:
        write_docs(generated)
        print(f"wrote the generated part of {DOCS}'s Training section")
    missed = missed_targets(results.get("preprocessing"), results.get("training"))
    for m in missed:
        print(f"TARGET MISSED: {m}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

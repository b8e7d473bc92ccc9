"""Training benchmark: our script against Stanford Alpaca's train.py, on CPU.

Same tiny LLaMA (alpaca_train.testing), same data (the 175 Alpaca seed tasks replicated):

1. Preprocessing 52,000 records: the reference's SupervisedDataset against ours
   (load, prompts, tokenization, labels), best of --repeats; the labels must be identical.
2. Training throughput in non-padding tokens per second (the Trainer's own count of
   non-padding input tokens, over the wall time of the steps after the first
   WARMUP_STEPS, timed by the same callback in both scripts): the reference's train.py
   against ours with the same batches, with length grouping, and with packing (ours and
   transformers' DataCollatorWithFlattening).

    .venv/bin/python bench/bench_train.py [--write-docs] [--repeats 2] [--rounds 5] [--steps 300]

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

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}; load average {load:.1f} at start (shared machine)")


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

REFERENCE = "reference (Stanford Alpaca train.py)"
SAME = "ours, same batches"
PACKING = "ours, --packing"
TRAIN_CONFIGS = {
    REFERENCE: ("reference", []),
    SAME: ("ours", []),
    "ours, --group_by_length": ("ours", ["--group_by_length", "True"]),
    PACKING: ("ours", ["--packing", "True"]),
    # transformers' DataCollatorWithFlattening: the whole micro-batch as one row.
    "ours, --packing --collator transformers": ("ours", ["--packing", "True", "--collator", "transformers"]),
}
# Medians of the paired per-round ratios against the reference (docs/benchmarks.md).
TARGETS = {SAME: 1.0, PACKING: 1.5}
PREPROCESSING_TARGET = 5.0
MIN_ROUNDS = 5


def train_once(kind: str, extra: list[str], model_dir: Path, data_path: Path, steps: int, out: Path, env: dict) -> dict:
    common = ["--model_name_or_path", str(model_dir), "--data_path", str(data_path), "--output_dir", str(out),
              "--max_steps", str(steps), "--per_device_train_batch_size", "4", "--learning_rate", "2e-5",
              "--logging_steps", str(steps), "--save_strategy", "no", "--report_to", "none", "--seed", "42"]
    main = REFERENCE_MAIN if kind == "reference" else OURS_MAIN
    cmd = [sys.executable, "-c", main, *common, *([] if kind == "reference" else extra)]
    clock = out / "step_clock.json"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=dict(env, BENCH_STEP_CLOCK=str(clock)), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} ... {' '.join(cmd[3:])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    ticks = json.loads(clock.read_text())
    if len(ticks) != steps:
        raise RuntimeError(f"{kind}: {len(ticks)} steps timed, {steps} asked for")
    (t0, n0), (t1, n1) = ticks[WARMUP_STEPS - 1], ticks[-1]
    return {"tokens": n1 - n0, "seconds": t1 - t0, "tokens_per_second": (n1 - n0) / (t1 - t0)}


def bench_training(model_dir: Path, records: list[dict], steps: int, repeats: int, workdir: Path) -> dict:
    data_path = workdir / "alpaca_data_train.json"
    data_path.write_text(json.dumps(records))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("ALPACA_FINETUNE_NAME", None)
    names = list(TRAIN_CONFIGS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        # Each round runs every configuration back to back, in a rotated order, so that
        # the load of a shared machine hits them alike; ratios are taken within a round.
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            kind, extra = TRAIN_CONFIGS[name]
            out = workdir / f"run-{r}-{re.sub(r'[^a-z]+', '-', name.lower())}"
            runs[name].append(train_once(kind, extra, model_dir, data_path, steps, out, env))
            print(f"  round {r + 1}: {name}: {runs[name][-1]['tokens_per_second']:.0f} tokens/s", flush=True)
        base = runs[names[0]][-1]["tokens_per_second"]
        for name in names:
            ratios[name].append(runs[name][-1]["tokens_per_second"] / base)
    median_tps = {name: statistics.median(x["tokens_per_second"] for x in rs) for name, rs in runs.items()}
    return {"steps": steps, "records": len(records), "runs": runs, "median_tokens_per_second": median_tps,
            "median_round_ratio": {name: statistics.median(v) for name, v in ratios.items()},
            "round_ratios": ratios}


def missed_targets(pre: dict, tr: dict) -> list[str]:
    missed = []
    if not pre["identical_labels"]:
        missed.append("preprocessing: labels differ from the reference's")
    if pre["speedup"] < PREPROCESSING_TARGET:
        missed.append(f"preprocessing: {pre['speedup']:.2f}x < {PREPROCESSING_TARGET}x")
    for name, target in TARGETS.items():
        got = tr["median_round_ratio"][name]
        if got < target:
            missed.append(f"{name}: median of paired ratios {got:.2f}x < {target}x")
    return missed


def markdown(pre: dict, tr: dict, when: str, where: str, args) -> str:
    lines = [
        "## Training",
        "",
        f"`make bench-train` (`.venv/bin/python bench/bench_train.py --write-docs`), {when}.",
        f"Machine: {where}. CPU only, one process, the tiny LLaMA of `alpaca_train.testing`",
        "(2 layers, hidden 64, a 1,024-token LLaMA tokenizer trained on the seed tasks), data: the 175",
        "Alpaca seed tasks replicated. Reference: Stanford Alpaca's train.py on the pinned transformers",
        "with only the renames transformers 5 needs (`bench/alpaca_reference.py`).",
        "",
        f"### Preprocessing {pre['records']:,} records ({pre['tokens']:,} tokens), best of {args.repeats}",
        "",
        "| | seconds | speed-up |",
        "|---|---:|---:|",
        f"| reference (`SupervisedDataset`) | {pre['seconds']['reference']:.1f} | 1.0x |",
        f"| ours (`load_records` + `SupervisedDataset.from_records`) | {pre['seconds']['ours']:.1f} | "
        f"**{pre['speedup']:.1f}x** |",
        "",
        f"Labels identical to the reference's, token for token, on all {pre['records']:,} records: "
        f"**{'yes' if pre['identical_labels'] else 'NO'}**. Target: at least 5x. The reference makes two",
        "`tokenizer(...)` calls per record (the full text, then the prompt alone to count its tokens);",
        "ours encodes the full texts in batches on the Rust backend and reads each prompt's token count",
        "off them where that is provably the same (LLaMA's BPE), tokenizing the prompt otherwise.",
        "",
        f"### Training throughput, {tr['steps']} steps of 4 examples (or 4 packs), {args.rounds} interleaved rounds",
        "",
        "Headline: the median over the rounds of each round's ratio to that round's reference run",
        "(the rounds run every configuration back to back, in a rotated order, so a load change",
        "hits a pair alike); beside it the spread of those ratios, lowest to highest.",
        "",
        "| | median of paired ratios | spread of the ratios | target | median non-padding tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in tr["median_tokens_per_second"].items():
        r = tr["round_ratios"][name]
        target = f"{TARGETS[name]:.1f}x" if name in TARGETS else ""
        met = "" if name not in TARGETS else (" (met)" if tr["median_round_ratio"][name] >= TARGETS[name] else " (**MISSED**)")
        lines.append(f"| {name} | **{tr['median_round_ratio'][name]:.2f}x**{met} | {min(r):.2f}x to {max(r):.2f}x | "
                     f"{target} | {v:,.0f} |")
    missed = missed_targets(pre, tr)
    lines += [
        "",
        "Rounds, ratio to the reference: " + "; ".join(
            f"{name}: {', '.join(f'{x:.2f}' for x in tr['round_ratios'][name])}"
            for name in tr["round_ratios"] if name != REFERENCE) + ".",
        "",
        ("**Targets missed in this run: " + "; ".join(missed) + ".** `make bench-train` exited non-zero."
         if missed else "Every target was met in this run."),
        "",
        "Tokens per second are the Trainer's count of non-padding input tokens over the wall time of steps",
        f"{WARMUP_STEPS + 1} to {tr['steps']}, both scripts timed by the same callback (`STEP_CLOCK` in the",
        "benchmark), so start-up, the data loader's start and the first steps count for neither.",
        "",
        "The same-batches run trains on the reference's batches with the reference's loss. What",
        "it leaves out is work that changes nothing: the padding is on the right and attention is",
        "causal, so no token with a label can see a pad, and ours sends no attention mask under",
        "SDPA (unless a pad token is spelled inside the text, which the reference masks). SDPA",
        "then runs its causal kernel instead of building and applying a padding mask; loss and",
        "logits agree (tests/test_train_data.py). FlashAttention keeps the mask, which lets it",
        "skip the padding. Length grouping and packing avoid computing on padding, and packing",
        "also needs fewer optimizer steps per token; a packed row keeps its examples apart",
        "(position ids restart). Under SDPA ours attends over each example of a pack on its own",
        "(`image/alpaca_train/attention.py`: transformers' SDPA call once per example) instead of",
        "over the row with transformers' block-diagonal mask. `--collator transformers` is",
        "transformers' `DataCollatorWithFlattening` (the whole micro-batch as one row, kept apart",
        "by that mask); ours stays the default for `--packing` because the table shows it faster",
        "here: SDPA's cost grows with the square of a row's length. Under FlashAttention both",
        "build the same one-row batches.",
        "",
        "Before these two changes, the same day and machine (2026-12-02 04:58, load 0.7, the",
        "Trainer's train_runtime over 150 steps): same batches 0.98x, MISSED (rounds 0.80 to",
        "1.16), `--group_by_length` 1.52x, packing 1.54x (1.31 to 1.95), transformers' collator",
        "0.69x; preprocessing 6.7x (its code did not change since: the lower figure above stands). In-process timing of the two changes alone (80 steps, the same",
        "batches): a padded step 51 to 54 ms with the mask, 43 to 44 ms without; a packed step 69",
        "to 72 ms with the block mask, 63 ms per example; the losses identical.",
        "",
        "How noisy one run is here: three back-to-back pairs of 150 steps on the idle machine",
        "(2026-12-02 05:38) gave the reference 18,246, 14,874 and 17,098 tokens/s and ours 20,126,",
        "19,532 and 19,473: a process's speed moves by up to 20% from one start to the next, the",
        "reference's against itself too, hence the paired rounds and their median. With one thread",
        "(OMP_NUM_THREADS=1) the runs were as scattered.",
        "",
        "GPU checks (`make test-gpu`, tests/test_gpu.py): not run in this session, which had no",
        "GPU; no GPU figures are claimed.",
        "",
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Training\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda m: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=52000)
    p.add_argument("--train-records", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2, help="preprocessing repeats")
    p.add_argument("--rounds", type=int, default=5, help="training rounds (every configuration once each)")
    p.add_argument("--write-docs", action="store_true", help=f"write the Training section of {DOCS}")
    args = p.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        p.error(f"--rounds must be at least {MIN_ROUNDS}: a median of fewer paired rounds is not a measurement")

    from alpaca_train import testing
    from alpaca_train.data import load_records

    model_dir = testing.build()
    seed = load_records(SEED_TASKS)
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    where = machine()
    print(where, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        print("preprocessing...", flush=True)
        pre = bench_preprocessing(model_dir, replicated(seed, args.records), args.repeats, tmp)
        print(json.dumps({k: v for k, v in pre.items() if k != "all_seconds"}, indent=1), flush=True)
        print("training...", flush=True)
        tr = bench_training(model_dir, replicated(seed, args.train_records), args.steps, args.rounds, tmp)
        print(json.dumps({k: tr[k] for k in ("median_tokens_per_second", "median_round_ratio", "round_ratios")},
                         indent=1))
    section = markdown(pre, tr, when, where, args)
    print(section)
    if args.write_docs:
        write_docs(section)
        print(f"wrote the Training section of {DOCS}")
    missed = missed_targets(pre, tr)
    for m in missed:
        print(f"TARGET MISSED: {m}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

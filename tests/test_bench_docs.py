"""What `bench/bench_train.py --write-docs` writes: the figures of the run it is given, and
nothing else (issue 17: it used to re-emit an earlier run's figures whatever it measured).

No training here: the runs are faked at `train_once`, so the real aggregation (rounds,
pairing, medians) feeds the real renderer.
"""
from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "bench_train.py"

_spec = importlib.util.spec_from_file_location("bench_train_under_test", SOURCE)
bt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bt)

# A figure as the docs print it: digits with optional thousands separators and decimals.
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")

# The settings of the fake run. They reach the text as the run's settings, not as results,
# and small integers like these are also in the source as format widths and defaults, so
# they are left out of the literal check; test_settings_come_from_the_results shows they
# are read from the results all the same. The measured figures are all checked.
STEPS, ROUNDS, LORA_ROUNDS, REPEATS = 37, 7, 3, 3
RECORDS, TRAIN_RECORDS = 5_200, 410
SETUP = {"layers": 3, "hidden": 48, "vocab": 777, "seed_tasks": 123, "repeats": REPEATS}


def numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in NUMBER.findall(text)}


def fake_train_once(seed: int, speeds: dict, lora_memory: float = 0.9, lora_checkpoint: float = 0.2):
    """train_once without training: each configuration at its own speed, with noise."""
    rng = random.Random(seed)

    def run(kind, extra, model_dir, data_path, steps, out, env, save=False):
        name = "reference" if kind == "reference" else " ".join(extra)
        lora = "--peft" in extra
        tps = speeds[name] * rng.uniform(0.8, 1.2)
        seconds = rng.uniform(20, 40)
        result = {"tokens": round(tps * seconds), "seconds": seconds, "tokens_per_second": tps,
                  "peak_rss_bytes": round(rng.uniform(500, 600) * 2**20 * (lora_memory if lora else 1))}
        if save:
            result["checkpoint_bytes"] = round(rng.uniform(2.5, 3) * 2**20 * (lora_checkpoint if lora else 1))
        return result
    return run


BASE_SPEEDS = {"reference": 17_000.0, "": 18_000.0, "--group_by_length True": 26_000.0, "--packing True": 33_000.0,
               "--packing True --collator transformers": 13_000.0, " ".join(bt.LORA_FLAGS): 15_000.0}


def fake_results(monkeypatch, tmp_path, seed=1, speeds=None, speedup=6.3456, identical=True, **lora) -> dict:
    monkeypatch.setattr(bt, "train_once", fake_train_once(seed, speeds or BASE_SPEEDS, **lora))
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seconds = {"reference": [rng.uniform(40, 50) for _ in range(REPEATS)]}
    seconds["ours"] = [s / speedup * rng.uniform(0.95, 1.05) for s in seconds["reference"]]
    best = {k: min(v) for k, v in seconds.items()}
    pre = {"records": RECORDS, "tokens": 1_097_293 + seed, "seconds": best, "all_seconds": seconds,
           "speedup": best["reference"] / best["ours"], "identical_labels": identical}
    records = [{"instruction": "x", "input": "", "output": "y"}] * TRAIN_RECORDS
    return {
        "when": "2031-07-19 08:43", "arguments": "--write-docs", "machine": "a fake CPU, 97 cores, Python and torch of no version",
        "load_start": rng.uniform(3, 9), "load_end": rng.uniform(3, 9), "minutes": rng.uniform(30, 90),
        "setup": SETUP, "preprocessing": pre,
        "training": bt.bench_training(tmp_path, records, STEPS, ROUNDS, tmp_path),
        "lora": bt.bench_lora(tmp_path, records, STEPS, LORA_ROUNDS, tmp_path),
    }


def generated(results: dict) -> str:
    text = bt.render(results)
    assert text.startswith(bt.BEGIN) and text.endswith(bt.END)
    return text[len(bt.BEGIN):-len(bt.END)]


def not_results() -> set[str]:
    """The figures of the generated part that are rightly fixed: others' published GPU
    figures (with their sources), the LoRA command line that was run, the targets and the
    minimum number of rounds (rules, not measurements), and the fake run's settings."""
    targets = [bt.target_text(t) for t in [*bt.TARGETS.values(), bt.PREPROCESSING_TARGET]]
    fixed = "\n".join([*bt.published_table(), bt.lora_command(), str(bt.MIN_ROUNDS), *targets])
    settings = [STEPS, ROUNDS, LORA_ROUNDS, RECORDS, TRAIN_RECORDS, bt.BATCH_SIZE, bt.WARMUP_STEPS + 1,
                *SETUP.values()]
    return numbers(fixed) | {str(s) for s in settings}


def test_no_figure_is_a_literal_of_the_generator(monkeypatch, tmp_path):
    text = generated(fake_results(monkeypatch, tmp_path))
    measured = numbers(text) - not_results()
    assert len(measured) > 40, f"too few figures to say anything: {sorted(measured)}"
    in_source = measured & numbers(SOURCE.read_text())
    assert not in_source, f"figures of the generated part written in bench/bench_train.py: {sorted(in_source)}"
    # The published figures are there, with their sources, beside the measured ones.
    for p in bt.PUBLISHED:
        assert p["url"] in text and f"{p['lora']:,}" in text and f"{p['full']:,}" in text


def test_other_results_give_other_figures(monkeypatch, tmp_path):
    def figures(text):  # in order of appearance, so each is compared with its counterpart
        return [n.replace(",", "") for n in NUMBER.findall(text)]

    a = figures(generated(fake_results(monkeypatch, tmp_path / "a", seed=1)))
    b = figures(generated(fake_results(monkeypatch, tmp_path / "b", seed=2)))
    assert len(a) == len(b)
    fixed = not_results() | numbers("2031-07-19 08:43 97")  # also the fake date and machine, the same in both
    same = [x for x, y in zip(a, b) if x == y and x not in fixed]
    # The reference against itself is always 1.00x; otherwise only a chance tie of the noise.
    assert len(same) < 0.15 * len(a), f"figures that did not change with the results: {same}"


def test_settings_come_from_the_results(monkeypatch, tmp_path):
    results = fake_results(monkeypatch, tmp_path)
    text = generated(results)
    assert f"{STEPS} steps" in text and f"{ROUNDS} interleaved rounds" in text and f"{LORA_ROUNDS} paired rounds" in text
    assert f"{SETUP['layers']} layers, hidden {SETUP['hidden']}" in text and f"{RECORDS:,} records" in text
    results["setup"] = dict(SETUP, layers=5, hidden=96)
    assert "5 layers, hidden 96" in generated(results)


def test_words_follow_the_figures(monkeypatch, tmp_path):
    text = generated(fake_results(monkeypatch, tmp_path / "a"))
    assert "ours was the faster of the two in this run" in text
    assert "LoRA trained at" in text and "full fine-tuning's tokens/s (slower)" in text
    assert "RSS (less)" in text and "the size (smaller)" in text
    assert "Every target was met in this run." in text and "MISSED" not in text

    speeds = dict(BASE_SPEEDS, **{"--packing True": 9_000.0, " ".join(bt.LORA_FLAGS): 40_000.0, "": 10_000.0})
    text = generated(fake_results(monkeypatch, tmp_path / "b", speeds=speeds, speedup=3.1, identical=False,
                                  lora_memory=1.4, lora_checkpoint=1.3))
    assert "ours was the slower of the two in this run" in text
    assert "full fine-tuning's tokens/s (faster)" in text and "RSS (more)" in text and "the size (larger)" in text
    assert "**Targets missed in this run: " in text and "labels differ" in text
    assert text.count("(**MISSED**)") == 3  # preprocessing, same batches, packing
    assert "Every target was met" not in text


def test_fewer_lora_rounds_are_said(monkeypatch, tmp_path):
    results = fake_results(monkeypatch, tmp_path)
    assert f"minimum of {bt.MIN_ROUNDS}" in generated(results)
    results["lora"]["rounds"] = bt.MIN_ROUNDS
    assert f"minimum of {bt.MIN_ROUNDS}" not in generated(results)


def test_write_docs_keeps_the_hand_kept_parts(monkeypatch, tmp_path):
    docs = tmp_path / "benchmarks.md"
    monkeypatch.setattr(bt, "DOCS", docs)
    history = "### Earlier runs (hand-kept)\n\n- 2026-12-02: same batches 0.98x.\n"
    operator = "## Operator\n\nkept too\n"
    docs.write_text(f"# Benchmarks\n\n## Training\n\nintro\n\n{bt.BEGIN}\nold figures\n{bt.END}\n\n{history}\n{operator}")
    bt.write_docs(f"{bt.BEGIN}\nnew figures\n{bt.END}")
    assert docs.read_text() == (f"# Benchmarks\n\n## Training\n\nintro\n\n{bt.BEGIN}\nnew figures\n{bt.END}\n\n"
                                f"{history}\n{operator}")

    docs.write_text("# Benchmarks\n\n## Training\n\nwritten by hand\n")
    with pytest.raises(SystemExit, match="no generated part"):
        bt.write_docs(f"{bt.BEGIN}\nnew\n{bt.END}")
    assert docs.read_text() == "# Benchmarks\n\n## Training\n\nwritten by hand\n"


def test_the_docs_have_the_markers():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert text.count(bt.BEGIN) == 1 and text.count(bt.END) == 1
    assert text.index("## Training") < text.index(bt.BEGIN) < text.index(bt.END) < text.index("## Operator")


def test_a_partial_run_says_what_it_did_not_measure(monkeypatch, tmp_path):
    results = fake_results(monkeypatch, tmp_path)
    del results["preprocessing"], results["training"]
    text = generated(results)
    assert "Not measured in this run (`--only`): preprocessing, training throughput;" in text
    assert "No target was judged in this run" in text and "Every target was met" not in text
    assert "### Full fine-tuning against LoRA" in text and "### Training throughput" not in text

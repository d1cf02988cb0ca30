"""bench/bench_recipes.py's table: a diverged training (NaN accuracy) is counted, never averaged."""
from __future__ import annotations

import argparse

from bench.bench_recipes import summarise


def _run(row: str, seed: int, accuracy: float) -> dict:
    return {"row": row, "seed": seed, "accuracy": accuracy}


def test_summarise_counts_diverged_seeds_and_names_the_recipe():
    args = argparse.Namespace(split="val", epochs=10, optimizer="sgd", lr=0.05)
    runs = [_run("float", 0, 96.0), _run("float", 1, 97.0),
            _run("w4_lsq", 0, 95.0), _run("w4_lsq", 1, float("nan")),
            _run("w2_lsq", 0, float("nan")), _run("w2_lsq", 1, float("nan"))]
    lines = summarise(runs, args).splitlines()
    assert lines[0].startswith("| row (val split, 10 epochs, SGD (momentum 0.9) 0.05, batch 128)")
    assert "| W4A4 lsq, random init | 95.00 +- 0.00 (1 seeds, 1 diverged) | -1.50 (vs float) |" in lines
    assert "| W2A2 lsq, random init | every seed diverged (2) | |" in lines


def test_summarise_header_names_batch_and_weight_decay():
    args = argparse.Namespace(split="test", epochs=10, optimizer="adam", lr=1e-3, batch=32, weight_decay=5e-4)
    header = summarise([_run("float", 0, 96.0)], args).splitlines()[0]
    assert header == "| row (test split, 10 epochs, Adam 0.001, weight decay 0.0005, batch 32) | accuracy % | vs float |"


def test_summarise_header_names_width_and_fine_tuning_epochs_and_labels_the_reference_with_them():
    args = argparse.Namespace(split="val", epochs=10, finetune_epochs=40, optimizer="adam", lr=1e-3, batch=128,
                              width=2)
    lines = summarise([_run("float_more", 0, 96.0), _run("ft_w2_lsq_keep8", 0, 94.5)], args).splitlines()
    assert lines[0] == ("| row (val split, 10 epochs (fine-tuned rows 40), Adam 0.001, DemoNet width x2, batch 128) "
                        "| accuracy % | vs float |")
    assert "| W2A2 lsq, keep_first_last: 8, fine-tuned | 94.50 +- 0.00 (1 seeds) | -1.50 (vs float, 40 more epochs) |" in lines

"""The conformance zoo's fast subset (bench/zoo.py): architectures of every common family through
the identity transform and the default W8A8 quantize + export with all its checks (op-by-op graph
parity, this CPU's kernels, the AVX2 u8s8 emulation). The full matrix is in docs/zoo.md."""
from __future__ import annotations

import pytest
import torch

from bench.zoo import QUICK_MODELS, run_model

COLUMNS = ("identity", "w8a8")


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICK_MODELS)
def test_zoo_model_transforms_and_exports_a_checked_int8_file(name, tmp_path):
    torch.set_num_threads(1)
    row = run_model(name, COLUMNS, steps=20, workdir=tmp_path)
    failures = {c: row[c] for c in COLUMNS if not row[c].startswith("ok")}
    assert not failures, f"{name}: {failures}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["transformer_encoder", "vit_small"])
def test_zoo_transformer_exports_a_checked_4bit_file(name, tmp_path):
    """W4A4 lsq through every check: the projections' biases (MatMul + Add) are rounded as PyTorch
    rounds them; left in float they failed parity on an AVX-512 Xeon (max |diff| 0.31)."""
    torch.set_num_threads(1)
    row = run_model(name, ("w4a4_lsq",), steps=20, workdir=tmp_path)
    assert row["w4a4_lsq"].startswith("ok"), f"{name}: {row['w4a4_lsq']}"

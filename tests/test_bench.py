"""The GPU benchmark and the FLOP estimates, run on CPU with SD 1.x's layout at a sliver of its width."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow


def test_flop_counts_grow_with_what_is_trained_and_with_steps():
    import estimate
    import sd_shapes

    pipe = sd_shapes.pipeline(size="tiny")
    kv = estimate.train_step_flops(pipe, "xattn_kv", batch=2, resolution=64)
    full = estimate.train_step_flops(pipe, "full", batch=2, resolution=64)
    assert 0 < kv < full  # weight gradients of every layer cost more than those of to_k / to_v
    two, four = (estimate.sampling_flops(pipe, 2, 64, steps) for steps in (2, 4))
    one_step = four - two
    assert one_step > 0 and two > 2 * one_step * 0.99  # text encoding and the decode come on top


def test_gpu_script_runs_on_cpu_and_writes_its_table(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--size=tiny", "--resolution=64", "--batch=2",
                        "--sample-steps=2", "--reps=1", "--peak-tflops=1", f"--out={out}"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    assert [row["unit"] for row in result["rows"]] == ["img/s", "steps/s", "steps/s"]
    for row in result["rows"]:
        assert row["per_s"] > 0 and row["flops"] > 0 and 0 < row["fraction_of_peak"] < 1
    assert "fraction of bf16 peak" in (out / "gpu.md").read_text()

"""The full-size model end to end, without weights: Stable Diffusion 1.x and 2.x shapes, random values.

``python -m ablate_jax.train`` runs every stage (anchors, training, evaluation with a CLIP
ViT-L/14-shaped evaluator, export) at tiny counts, in float32 and bfloat16; the export then loads in
diffusers' ``StableDiffusionPipeline`` and its UNet computes what the JAX ablated UNet computes.
Slow (README, "Tests"): the model folders alone are 11 GB.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_models import rel_err

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Every stage, at the smallest counts that exercise it.
TINY_COUNTS = {
    "anchors.num_images": 2, "anchors.steps": 2, "anchors.batch_size": 2, "anchors.shard_size": 2,
    "train.steps": 2, "train.batch_size": 1, "train.checkpoint_every": 2, "train.log_every": 1,
    "eval.num_images": 2, "eval.steps": 2, "eval.batch_size": 2, "eval.sets": "grumpy_cat;cat",
    "eval.misspelling": "false",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from full_models import save_clip_l14, save_sd_pipeline

    root = tmp_path_factory.mktemp("full")
    return {"sd1": save_sd_pipeline(root / "sd1", "sd1"), "sd2": save_sd_pipeline(root / "sd2", "sd2", seed=1),
            "clip": save_clip_l14(root / "clip-l14")}


def _train(model: Path, clip: Path, workdir: Path, dtype: str) -> subprocess.CompletedProcess:
    flags = [f"--config.{k}={v}" for k, v in {**TINY_COUNTS, "dtype": dtype, "eval.clip": clip}.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    cmd = [sys.executable, "-m", "ablate_jax.train", f"--config={ROOT / 'configs' / 'xattn.py'}:concept=grumpy_cat,model={model}",
           f"--workdir={workdir}", "--noprogress", "--cpu_devices=1", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3 * 3600)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_stage_runs_at_full_size_and_the_export_matches_jax(folders, tmp_path, kind, dtype):
    import torch
    from diffusers import StableDiffusionPipeline

    from ablate_jax import checkpointing, config, train
    from ablate_jax.models import load_pipeline
    from ablate_jax.workdir import open_workdir

    workdir = tmp_path / "w"
    out = _train(folders[kind], folders["clip"], workdir, dtype)
    assert out.returncode == 0, out.stderr[-4000:]

    resolved = json.loads((workdir / "config.json").read_text())
    assert resolved["family"] == kind and resolved["config"]["dtype"] == dtype
    assert resolved["config"]["train"]["learning_rate"] == 1.6e-5  # Stable Diffusion's, not the toy world's
    report = json.loads((workdir / "eval" / "report.json").read_text())
    assert set(report["sets"]) == {"grumpy_cat", "cat"} and report["settings"]["clip"] == str(folders["clip"])
    assert checkpointing.manager(workdir).latest_step() == 2

    pipe = StableDiffusionPipeline.from_pretrained(workdir / "export" / "pipeline", safety_checker=None)
    base = load_pipeline(folders[kind])  # float32
    cfg = config.resolve(train.config_lib.finalize(train.config_lib.base_config(), ",".join(
        [f"concept=grumpy_cat,model={folders[kind]},eval.clip={folders['clip']},dtype={dtype}"]
        + [f"{k}={v}" for k, v in TINY_COUNTS.items()])))
    ablated = checkpointing.restore_ablated_params(open_workdir(cfg, workdir), base)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 32, 32, 4)).astype(np.float32)
    context = rng.standard_normal((1, 77, base.unet.cross_attention_dim)).astype(np.float32)
    t = np.array([500])
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(base.unet.apply({"params": ablated["unet"]}, x, t, context))
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                           torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
    err = rel_err(ours, theirs)
    print(f"{kind} {dtype}: export UNet vs JAX ablated UNet, relative error {err:.2e}")
    assert err <= 1e-4
    # The ablation moved the model: the export is not the base.
    with jax.default_matmul_precision("highest"):
        before = np.asarray(base.unet.apply({"params": base.params["unet"]}, x, t, context))
    assert rel_err(before, theirs) > 1e-7

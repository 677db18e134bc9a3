"""The launch scripts: syntax, and the exact commands their dry runs print."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_pod.sh", "xpk.sh", "slurm_gpu.sbatch", "common.sh"]


def _run(script, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=full_env,
                          timeout=60)


def _commands(stdout):
    """The printed commands, as argument lists (each line is shell that can be pasted back)."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True).returncode == 0


def test_tpu_pod_dry_run(tmp_path):
    r = _run("tpu_pod.sh", "--name=abl", "--zone=us-west4-a", "--type=v5litepod-16", "--workdir=/gcs/b/run",
             "--mount-bucket=b", "--project=proj", "--create", "--delete", "--dry-run",
             "--config=configs/xattn.py:concept=grumpy_cat", "--", "--config.train.steps=10",
             "--config.concept.target=grumpy cat", env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    where = ["--zone=us-west4-a", "--project=proj"]
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "abl", *where,
                       "--accelerator-type=v5litepod-16", "--version=tpu-ubuntu2204-base"]
    assert cmds[1][:2] == ["tar", "-C"] and cmds[1][-4:] == ["setup.py", "README.md", "ablate_jax", "configs"]
    assert cmds[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tmp_path / "ablate_jax-src-abl.tgz"),
                       "abl:ablate_jax-src.tgz", *where, "--worker=all"]
    install = cmds[3][-1]
    assert cmds[3][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "abl"] and "--worker=all" in cmds[3]
    assert 'pip install -q -U "jax[tpu]" ./ablate_jax' in install
    assert "gcsfuse --implicit-dirs b /gcs/b" in cmds[4][-1]
    train = cmds[5][-1]
    assert train.startswith("--command=")
    assert shlex.split(train.removeprefix("--command=")) == [
        "cd", "ablate_jax", "&&", "python3", "-m", "ablate_jax.train", "--config=configs/xattn.py:concept=grumpy_cat",
        "--workdir=/gcs/b/run", "--distributed", "--config.train.steps=10", "--config.concept.target=grumpy cat"]
    assert cmds[6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "abl", *where, "--quiet"]
    assert len(cmds) == 7
    assert not list(tmp_path.iterdir()), "a dry run wrote something"


def test_tpu_pod_takes_a_bucket_workdir_without_a_mount(tmp_path):
    r = _run("tpu_pod.sh", "--name=abl", "--zone=z", "--workdir=gs://b/runs/smiley", "--dry-run",
             env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    assert not any("gcsfuse" in " ".join(c) for c in cmds)
    train = shlex.split(cmds[-1][-1].removeprefix("--command="))
    assert "--workdir=gs://b/runs/smiley" in train and train[-1] == "--distributed"


def test_tpu_pod_refuses_incomplete_arguments():
    r = _run("tpu_pod.sh", "--name=abl", "--workdir=/gcs/b/run", "--dry-run")
    assert r.returncode == 2 and "--zone is required" in r.stderr
    r = _run("tpu_pod.sh", "--name=abl", "--zone=z", "--workdir=relative/run", "--dry-run")
    assert r.returncode == 2 and "gs:// URL or an absolute path" in r.stderr
    r = _run("tpu_pod.sh", "--name=abl", "--zone=z", "--workdir=/gcs/b/run", "--create", "--dry-run")
    assert r.returncode == 2 and "--create needs --type" in r.stderr
    r = _run("tpu_pod.sh", "--bogus")
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr


def test_xpk_dry_run(tmp_path):
    r = _run("xpk.sh", "--cluster=c1", "--workload=w1", "--tpu-type=v5litepod-16", "--num-slices=2",
             "--workdir=/gcs/run", "--dry-run", "--", "--config.train.steps=5", env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    cmds = _commands(r.stdout)
    create = cmds[-1]
    assert create[:3] == ["xpk", "workload", "create"]
    assert {"--workload=w1", "--cluster=c1", "--tpu-type=v5litepod-16", "--num-slices=2",
            f"--script-dir={tmp_path / 'ablate_jax-xpk-w1'}", "--base-docker-image=python:3.11"} <= set(create)
    command = next(a for a in create if a.startswith("--command=")).removeprefix("--command=")
    assert command.endswith("python3 -m ablate_jax.train --config=configs/xattn.py --workdir=/gcs/run --distributed "
                            "--config.train.steps=5")
    r = _run("xpk.sh", "--cluster=c1", "--workload=w1", "--delete", "--dry-run")
    assert _commands(r.stdout) == [["xpk", "workload", "delete", "--workload=w1", "--cluster=c1"]]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("nodelist, nnodes, coordinator", [
    ("gpu-a[017-020]", "4", "gpu-a017"),
    ("n1,n2", "2", "n1"),
    ("node[3,5]", "2", "node3"),
])
def test_slurm_dry_run_takes_the_coordinator_and_ranks_from_slurm(nodelist, nnodes, coordinator):
    r = _run("slurm_gpu.sbatch", "--dry-run", "--workdir=/shared/run", "--port=2222", "--",
             "--config.concept.target=grumpy cat", env={"SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": nnodes})
    assert r.returncode == 0, r.stderr
    (cmd,) = _commands(r.stdout)
    assert cmd[:6] == ["srun", f"--ntasks={nnodes}", "--ntasks-per-node=1", "bash", "-c", cmd[5]]
    # What each task runs, with its own SLURM_PROCID.
    per_task = shlex.split(cmd[5].replace("$SLURM_PROCID", "1"))
    assert per_task == ["exec", "python", "-m", "ablate_jax.train", "--config=configs/xattn.py", "--workdir=/shared/run",
                        f"--coordinator_address={coordinator}:2222", f"--num_processes={nnodes}", "--process_id=1",
                        "--config.concept.target=grumpy cat"]


def test_slurm_refuses_a_missing_workdir():
    r = _run("slurm_gpu.sbatch", "--dry-run")
    assert r.returncode == 2 and "--workdir is required" in r.stderr

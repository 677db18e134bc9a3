"""Test session set-up: 8 virtual CPU devices, so sharded code runs sharded.

The environment must be set before jax is first imported, which is why this happens at
module import time rather than in a fixture.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never reach a model hub; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests (and the commands they start as subprocesses, which inherit this) compile the same
# programs for separately loaded copies of one model; a session-wide persistent cache compiles
# each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="ablate_jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory):
    """A random tiny Stable Diffusion 1.x-shaped diffusers folder (epsilon prediction)."""
    from tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "sd1", kind="sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory):
    """A random tiny Stable Diffusion 2.x-shaped diffusers folder (v prediction, linear projections)."""
    from tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "sd2", kind="sd2", seed=1)


@pytest.fixture(scope="session")
def toy_pipe():
    """One loaded toy model for the session's training runs, so that they share compiled programs
    (they are cached per pipeline object)."""
    from ablate_jax.models import load_pipeline

    return load_pipeline("toy")

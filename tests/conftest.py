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
# gs:// paths go to a local emulator (the gcs_bucket fixture). TensorFlow's GCS file system cannot
# be pointed at one, so etils.epath uses gcsfs; epath reads this once per process, before any
# path is opened. gcsfs would first ask over gRPC for a bucket's type, which the emulator does
# not serve.
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Many tests (and the commands they start as subprocesses, which inherit this) compile the same
# programs for separately loaded copies of one model; a session-wide persistent cache compiles
# each once. Under pytest-xdist the controller makes it and the workers inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="ablate_jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402  (after the environment is set)

# The files that take longest, in that order. Under pytest-xdist's --dist loadfile with
# --no-loadscope-reorder (the Makefile's), whole files go to workers in collection order; started
# first, these never leave one worker running alone at the end while the others are idle.
LONGEST_FIRST = ("test_multihost.py", "test_train.py", "test_sweep.py", "test_demo.py", "test_attacks.py",
                 "test_unet.py", "test_toy_models.py", "test_text_to_image.py", "test_fsdp.py", "test_bad_input.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept

from ablate_jax import distributed  # noqa: E402  (imports jax; its backends start later)
from ablate_jax.toy import shipped_path  # noqa: E402

# The XLA options every command sets, so that tests compute what the commands compute, in this
# process and in the commands it starts (they inherit XLA_FLAGS).
distributed.tune_cpu_compiler()

TEST_BUCKET = "ablate-test"


@pytest.fixture(scope="session")
def gcs_bucket():
    """``gs://ablate-test``: a bucket on a local Cloud Storage emulator, reached through the same
    clients as the real service by this process and by the commands it starts (they inherit the
    environment set here)."""
    import gcs_emulator

    server, url = gcs_emulator.start(TEST_BUCKET)
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, behind etils.epath
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's GCS reader
        "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's array storage
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no credential lookup
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            yield f"gs://{TEST_BUCKET}"
    finally:
        server.stop()


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

    return load_pipeline(shipped_path("pipeline"))

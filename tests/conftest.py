"""Shared fixtures. `../shared` (real CIFAR-10 JPEGs, teachers, embeddings) is
read where it exists; tests that need it skip with the reason otherwise."""

import os
import pathlib
import tempfile

# 8 simulated CPU devices for the data-parallel tests; must precede importing jax.
from xla_test_flags import FAST_COMPILE  # noqa: E402

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
# The suite checks numbers against float32 CPU references (PyTorch twins, float64 loops, bit-identical
# resumes), so it runs on JAX's CPU backend even where jax[cuda12] is installed: GPUs would default to
# TF32 matmuls and non-deterministic reductions. The GPU path is measured by benchmarks/. Set
# JAX_PLATFORMS yourself to run the suite elsewhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Runs default to a persistent XLA cache in the user's home; tests keep theirs in a temp dir.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="caedfkd_test_xla_"))
# ... and cache every program, not only those over JAX's 1-s default: the tiny test programs
# compile in under a second, again in every module and subprocess that builds them (measured:
# resume, methods and runs tests 190 s -> 166 s on 2 cores).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tiny_run import NUM_CLASSES  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("CAEDFKD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _shared(relative: str) -> pathlib.Path:
  path = SHARED_DATA / relative
  if not path.exists():
    pytest.skip(f"{path} is absent: this test needs the project's shared data "
                "(set CAEDFKD_SHARED_DATA to its location)")
  return path


@pytest.fixture
def cifar10_dir() -> pathlib.Path:
  return _shared("cifar10")


@pytest.fixture
def teachers_dir() -> pathlib.Path:
  return _shared("teachers/akamaster-cifar10")


@pytest.fixture
def embeddings_dir() -> pathlib.Path:
  return _shared("embeddings")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> str:
  """A tiny random teacher (see tiny_run.py): the mechanics do not need a good one."""
  from caedfkd_jax.io import bundle
  directory = tmp_path_factory.mktemp("teacher")
  spec = bundle.ModelSpec("resnet_tiny_a", NUM_CLASSES, 32,
                          class_names=[f"c{k}" for k in range(NUM_CLASSES)])
  bundle.save_bundle(str(directory), spec, bundle.init_variables(spec, 1))
  return str(directory)


@pytest.fixture(scope="session")
def table_path(tmp_path_factory) -> str:
  """A random embedding table for the tiny teacher's classes c0..c3."""
  from caedfkd_jax.io import embeddings
  vectors = np.random.default_rng(0).normal(size=(NUM_CLASSES, 16)).astype(np.float32)
  table = embeddings.EmbeddingTable(vectors, [f"c{k}" for k in range(NUM_CLASSES)], {"encoder": "test"})
  path = str(tmp_path_factory.mktemp("table") / "table.npy")
  table.save(path)
  return path


# The modules that take a minute or more, longest first (measured with --durations on 2 cores).
# Under `-n 2 --dist loadscope` each module goes whole to one worker in collection order, so a long
# module collected last leaves the other worker idle at the end; collected first, the short ones
# fill in around it. xdist would otherwise order modules by their number of tests
# (pyproject.toml turns that off).
LONG_MODULES = ("gpu_checklist_test.py", "train_test.py", "runs_test.py", "bad_inputs_test.py",
                "multihost_test.py", "notebook_test.py", "kill_test.py", "resume_test.py",
                "diffdfkd_method_test.py", "cpsc_method_test.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONG_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))

r"""Bad inputs fed to the real `caedfkd` command, and what each one gets.

The reliability goal: every bad file, path, config value or data spec ends in exit code 2 and
one line on stderr that names the bad value and the fix, never a traceback. Each case here is
one such input, run as a user runs it: `python -m caedfkd_jax.cli.main ...` in a fresh process
with a timeout, so a traceback or a crash shows exactly as the user would see it. The files a
case needs (tiny teacher bundles, embedding tables, PyTorch checkpoints, corrupt files, image
folders, a checkpointed distill workdir) are made in a temp dir as they are needed.

  python -m benchmarks.bad_inputs                  # the markdown table in docs/results.md
  python -m benchmarks.bad_inputs --only distill   # cases whose command starts so

The table's commands use placeholders for those files (see LEGEND); temp paths in the
messages are replaced by the same placeholders. tests/bad_inputs_test.py runs every case and
asserts its exit code, one stderr line, no traceback and the case's expected words.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 4
CLASSES = [f"c{k}" for k in range(NUM_CLASSES)]
MAX_SHOWN = 400  # characters of a message shown in the table


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input. `{name}` in argv/expect is the path of the Workspace file `name`."""
  name: str                # the bad input, in words
  argv: tuple[str, ...]    # after `caedfkd`
  expect: str              # the error line must contain this (it names the bad value)
  code: int = 2            # the documented exit code


@dataclasses.dataclass
class Outcome:
  case: Case
  command: str             # with placeholders
  code: int | None         # None: stopped at the timeout
  lines: list[str]         # stderr's non-empty lines, placeholders for temp paths
  seconds: float

  @property
  def traceback(self) -> bool:
    return any("Traceback" in line for line in self.lines)

  @property
  def ok(self) -> bool:
    """What the reliability issue asks: the code, one line, no traceback, the bad value named."""
    return (self.code == self.case.code and len(self.lines) == 1 and not self.traceback
            and self.expected in self.lines[0])

  @property
  def expected(self) -> str:
    return _placeholders(self.case.expect)


# ---------------------------------------------------------------------------
# The files the cases need.

# Placeholder -> what it stands for (printed above the table).
LEGEND = {
    "TEACHER": "a tiny teacher bundle (resnet_tiny_a, 4 classes c0..c3, 32x32)",
    "OTHER_TEACHER": "a teacher of the same arch and classes with other weights",
    "BUNDLE": "a model bundle that is already there",
    "TABLE": "an embedding table of c0..c3",
    "OTHER_TABLE": "an embedding table of 4 other classes",
    "CKPT": "a PyTorch state dict of TEACHER (torch.save)",
    "TRUNCATED_CKPT": "CKPT cut in half",
    "EVIL_CKPT": "a torch.save pickle that would create a file when unpickled",
    "NOT_A_BUNDLE": "an empty directory",
    "BAD_JSON_BUNDLE": "TEACHER with a model.json cut short",
    "NO_VARIABLES_BUNDLE": "TEACHER without its variables/ directory",
    "CORRUPT_TABLE": "TABLE with garbage in its .npy",
    "A_FILE": "a plain file",
    "MISSING": "a path that does not exist",
    "NEW_DIR": "a fresh directory per case",
    "IMAGES": "an image folder IMAGES/test/<k>_c<k>/*.png, 4 classes, 32x32",
    "EMPTY_DIR": "an empty directory",
    "FLAT_IMAGES": "FLAT_IMAGES/test/*.png, no class folders",
    "THREE_CLASSES": "an image folder of 3 classes",
    "SMALL_IMAGES": "an image folder of 4 classes, 16x16",
    "CORRUPT_CIFAR": "a cifar-10-batches-py directory with garbage batches.meta and test_batch",
    "EMPTY_CLASSES": "a class list file with blank lines only",
    "RAISING_CONFIG": "a config file whose get_config raises NameError",
    "NOT_PYTHON_CONFIG": "a config file that is not Python",
    "RESUME_DIR": "a workdir holding a checkpoint of a tiny `RESUME` run stopped after 1 unit",
    "DEMO_DIR": "a `caedfkd demo` workdir made with --seed 0",
    "SHUFFLED_CLASSES": "IMAGES with its folders named 0_c1, 1_c0, 2_c2, 3_c3 (c0 and c1 swapped)",
    "OTHER_CLASSES": "IMAGES with its folders named cat, dog, ship, truck",
}
_PLACEHOLDER_OF = {name.lower(): name for name in LEGEND}

# The command prefixes the table abbreviates.
DISTILL = ("distill", "--config", "cifar10_resnet56_resnet20", "--workdir", "{new_dir}",
           "--config.teacher={teacher}", "--config.teacher_arch_expected=",
           "--config.embeddings={table}", "--config.student_arch=resnet_tiny_a")
TINY_RUN = ("--config.cend.num_sources=1", "--config.num_groups=2", "--config.generator.ngf=4",
            "--config.generator.noise_dim=8", "--config.generator.steps=1",
            "--config.warmup_g_loops=2", "--config.student.batch_groups=2",
            "--config.student.kd_steps=2", "--config.student.steps_per_call=1",
            "--config.warmup_epochs=1", "--config.epochs=2", "--config.compilation_cache_dir=")
RESUME = (*DISTILL[:4], "{resume_dir}", *DISTILL[5:], *TINY_RUN)
# `caedfkd train` on the 2-image-a-class IMAGES folder's only split.
TRAIN = ("train", "--config", "train_cifar:resnet_tiny_a", "--workdir", "{new_dir}",
         "--config.data={images}", "--config.train_split=test", "--config.test_split=",
         "--config.batch_size=8")
ABBREVIATIONS = {"DISTILL": DISTILL, "RESUME": RESUME, "TRAIN": TRAIN}


class _RunsCode:
  """Unpickling this opens (creates) a file: the stand-in for code hidden in a checkpoint."""

  def __init__(self, path: str):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


class Workspace:
  """Makes the files of the cases under `root`, each once, when first needed (thread-safe:
  cases running at once wait for a file that one of them is making)."""

  def __init__(self, root: str):
    self.root = root
    self.paths: dict[str, str] = {}
    self._locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
    self._guard = threading.Lock()

  def path(self, name: str) -> str:
    if name == "new_dir":
      raise KeyError("new_dir is per case: see Workspace.fill")
    with self._guard:
      lock = self._locks[name]
    with lock:
      if name not in self.paths:
        self.paths[name] = getattr(self, f"_make_{name}")(os.path.join(self.root, name))
    return self.paths[name]

  def fill(self, text: str, new_dir: str, **given: str) -> str:
    """`text` with its `{name}`s replaced by paths (`given` ones, then made ones)."""
    given["new_dir"] = new_dir
    return text.format(**{n: given[n] if n in given else self.path(n) for n in _fields(text)})

  def evil_marker(self) -> str:
    """The file EVIL_CKPT would create if it were ever unpickled."""
    return os.path.join(self.root, "evil_ran")

  # Builders: each writes `path` (and what it needs) and returns it.

  def _make_teacher(self, path: str, seed: int = 1) -> str:
    from caedfkd_jax.io import bundle
    spec = bundle.ModelSpec("resnet_tiny_a", NUM_CLASSES, 32, class_names=CLASSES)
    return bundle.save_bundle(path, spec, bundle.init_variables(spec, seed))

  def _make_other_teacher(self, path: str) -> str:
    return self._make_teacher(path, seed=7)

  def _make_bundle(self, path: str) -> str:
    shutil.copytree(self.path("teacher"), path)
    return path

  def _make_table(self, path: str, classes: list[str] = CLASSES) -> str:
    import numpy as np
    from caedfkd_jax.io import embeddings
    vectors = np.random.default_rng(0).normal(size=(len(classes), 16))
    return embeddings.EmbeddingTable(vectors, classes, {"encoder": "random"}).save(path + ".npy")

  def _make_other_table(self, path: str) -> str:
    return self._make_table(path, ["cat", "dog", "ship", "truck"])

  def _make_ckpt(self, path: str) -> str:
    import torch
    from caedfkd_jax.io import export
    state_dict, _ = export.bundle_state_dict(self.path("teacher"))
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path + ".pt")
    return path + ".pt"

  def _make_truncated_ckpt(self, path: str) -> str:
    with open(self.path("ckpt"), "rb") as f:
      data = f.read()
    with open(path + ".pt", "wb") as f:
      f.write(data[:len(data) // 2])
    return path + ".pt"

  def _make_evil_ckpt(self, path: str) -> str:
    import torch
    torch.save({"state_dict": {"conv1.weight": _RunsCode(self.evil_marker())}}, path + ".pt")
    return path + ".pt"

  def _make_bad_json_bundle(self, path: str) -> str:
    shutil.copytree(self.path("teacher"), path)
    with open(os.path.join(path, "model.json"), "r+") as f:
      f.truncate(len(f.read()) // 2)
    return path

  def _make_no_variables_bundle(self, path: str) -> str:
    shutil.copytree(self.path("teacher"), path)
    shutil.rmtree(os.path.join(path, "variables"))
    return path

  def _make_corrupt_table(self, path: str) -> str:
    npy = self._make_table(path)
    with open(npy, "wb") as f:
      f.write(b"garbage, not an .npy file\n")
    return npy

  def _make_a_file(self, path: str) -> str:
    with open(path, "w") as f:
      f.write("a file\n")
    return path

  def _make_not_a_bundle(self, path: str) -> str:
    os.makedirs(path)
    return path

  _make_empty_dir = _make_not_a_bundle

  def _make_missing(self, path: str) -> str:
    return path  # never created

  def _images(self, path: str, classes: int, size: int) -> str:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for k in range(classes):
      folder = os.path.join(path, "test", f"{k}_c{k}")
      os.makedirs(folder)
      for i in range(2):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
    return path

  def _named_images(self, path: str, names: list[str]) -> str:
    """IMAGES' images under other folder names: folder k is `names[k]`."""
    images = self.path("images")
    for k, name in enumerate(names):
      shutil.copytree(os.path.join(images, "test", f"{k}_c{k}"), os.path.join(path, "test", name))
    return path

  def _make_shuffled_classes(self, path: str) -> str:
    return self._named_images(path, ["0_c1", "1_c0", "2_c2", "3_c3"])

  def _make_other_classes(self, path: str) -> str:
    return self._named_images(path, ["cat", "dog", "ship", "truck"])

  def _make_images(self, path: str) -> str:
    return self._images(path, NUM_CLASSES, 32)

  def _make_three_classes(self, path: str) -> str:
    return self._images(path, 3, 32)

  def _make_small_images(self, path: str) -> str:
    return self._images(path, NUM_CLASSES, 16)

  def _make_flat_images(self, path: str) -> str:
    images = self.path("images")
    os.makedirs(os.path.join(path, "test"))
    for k in range(NUM_CLASSES):
      shutil.copy(os.path.join(images, "test", f"{k}_c{k}", "0000.png"),
                  os.path.join(path, "test", f"{k:04d}.png"))
    return path

  def _make_corrupt_cifar(self, path: str) -> str:
    os.makedirs(path)
    for name in ("batches.meta", "test_batch"):
      with open(os.path.join(path, name), "wb") as f:
        f.write(b"this is not a pickle\n" * 10)
    return path

  def _make_empty_classes(self, path: str) -> str:
    with open(path + ".txt", "w") as f:
      f.write("\n  \n")
    return path + ".txt"

  def _make_raising_config(self, path: str) -> str:
    with open(path + ".py", "w") as f:
      f.write("from caedfkd_jax.config import defaults\n\n\ndef get_config():\n"
              "  config = defaults.get_config()\n  config.epochs = epochs_typo\n"
              "  return config\n")
    return path + ".py"

  def _make_not_python_config(self, path: str) -> str:
    with open(path + ".yaml", "w") as f:
      f.write("epochs: 10\nstudent:\n  lr: 0.1\n")
    return path + ".yaml"

  def _make_resume_dir(self, path: str) -> str:
    """A tiny run stopped after one unit, checkpointed: what the resume cases resume."""
    argv = [self.fill(a, "", resume_dir=path) for a in (*RESUME, "--config.max_units=1")]
    done = _run_cli(argv, timeout_s=600)
    if done[0] != 0:
      raise RuntimeError(f"the tiny distill run for RESUME_DIR failed ({done[0]}): "
                         f"{done[2][-2000:]}")
    return path

  def _make_demo_dir(self, path: str) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "demo.json"), "w") as f:  # what `caedfkd demo` writes first
      json.dump({"teacher_epochs": 30, "seed": 0}, f)
    return path


# ---------------------------------------------------------------------------
# The cases.

def _convert(src: str, *extra: str) -> tuple[str, ...]:
  return ("convert", src, "--arch", "resnet_tiny_a", "--num-classes", "4", "--out", "{new_dir}",
          *extra)


CASES: list[Case] = [
    # convert
    Case("checkpoint file missing", _convert("{missing}.pt"), "{missing}.pt does not exist"),
    Case("checkpoint truncated (corrupt)", _convert("{truncated_ckpt}"),
         "{truncated_ckpt} is not a readable PyTorch checkpoint"),
    Case("checkpoint is an image file", _convert("{images}/test/0_c0/0000.png"),
         "0000.png is not a readable PyTorch checkpoint"),
    Case("pickle that would execute code", _convert("{evil_ckpt}"),
         "{evil_ckpt} was refused"),
    Case("--arch of other weights",
         ("convert", "{ckpt}", "--arch", "resnet8", "--num-classes", "4", "--out", "{new_dir}"),
         "does not fit --arch resnet8"),
    Case("unknown --arch",
         ("convert", "{ckpt}", "--arch", "resnet21", "--num-classes", "4", "--out", "{new_dir}"),
         "Unknown arch 'resnet21'"),
    Case("--num-classes differs from the checkpoint",
         ("convert", "{ckpt}", "--arch", "resnet_tiny_a", "--num-classes", "10", "--out",
          "{new_dir}"), "has 4 classes, not the --num-classes 10"),
    Case("--class-names of another class count", _convert("{ckpt}", "--class-names", "cifar10"),
         "10 class names given for --num-classes 4"),
    Case("unknown --preset", _convert("{ckpt}", "--preset", "imagenet"),
         "--preset: invalid choice: 'imagenet'"),
    Case("--num-classes not a number",
         ("convert", "{ckpt}", "--arch", "resnet_tiny_a", "--num-classes", "ten", "--out",
          "{new_dir}"), "--num-classes: invalid int value: 'ten'"),
    Case("--out holds a bundle, no --overwrite",
         ("convert", "{ckpt}", "--arch", "resnet_tiny_a", "--num-classes", "4", "--out",
          "{bundle}"), "--out {bundle} exists; pass --overwrite to replace it"),
    # export
    Case("export: not a bundle", ("export", "{not_a_bundle}", "--out", "{new_dir}/w.pt"),
         "{not_a_bundle} is not a model bundle"),
    Case("export: bundle with a corrupt model.json",
         ("export", "{bad_json_bundle}", "--out", "{new_dir}/w.pt"),
         "{bad_json_bundle}/model.json is not a valid bundle spec"),
    Case("export: unknown --format", ("export", "{teacher}", "--format", "onnx", "--out",
                                      "{new_dir}/w.onnx"), "--format: invalid choice: 'onnx'"),
    Case("export: --out suffix of no format", ("export", "{teacher}", "--out", "{new_dir}/w.onnx"),
         "cannot tell the format of {new_dir}/w.onnx"),
    # evaluate
    Case("evaluate: not a bundle", ("evaluate", "--model", "{not_a_bundle}", "--data", "{images}"),
         "{not_a_bundle} is not a model bundle"),
    Case("evaluate: bundle without its variables", ("evaluate", "--model",
                                                    "{no_variables_bundle}", "--data", "{images}"),
         "{no_variables_bundle} is not a complete model bundle"),
    Case("evaluate: data path missing", ("evaluate", "--model", "{teacher}", "--data", "{missing}"),
         "{missing} does not exist"),
    Case("evaluate: data path is a file", ("evaluate", "--model", "{teacher}", "--data", "{ckpt}"),
         "{ckpt} is a file, not a directory"),
    Case("evaluate: empty image folder", ("evaluate", "--model", "{teacher}", "--data",
                                          "{empty_dir}"), "{empty_dir} is empty"),
    Case("evaluate: images without class folders", ("evaluate", "--model", "{teacher}", "--data",
                                                    "{flat_images}"),
         "{flat_images}/test has no class folders"),
    Case("evaluate: unknown --split", ("evaluate", "--model", "{teacher}", "--data", "{images}",
                                       "--split", "val"), "has no split 'val'"),
    Case("evaluate: data of 3 classes for a 4-class model",
         ("evaluate", "--model", "{teacher}", "--data", "{three_classes}"),
         "The model has 4 classes but the data has 3"),
    Case("evaluate: 16x16 images for a 32x32 model",
         ("evaluate", "--model", "{teacher}", "--data", "{small_images}"),
         "the data's are 16x16"),
    Case("evaluate: unknown TFDS dataset",
         ("evaluate", "--model", "{teacher}", "--data", "tfds:no_such_dataset"),
         "tfds:no_such_dataset"),
    Case("evaluate: corrupt CIFAR python batches",
         ("evaluate", "--model", "{teacher}", "--data", "{corrupt_cifar}"),
         "{corrupt_cifar}/batches.meta is not a readable"),
    # probe
    Case("evaluate: class folders in another order than the model's classes",
         ("evaluate", "--model", "{teacher}", "--data", "{shuffled_classes}"),
         "holds the model's classes in another order: label 0 is '0_c1'"),
    Case("evaluate: class folders of other classes than the model's",
         ("evaluate", "--model", "{teacher}", "--data", "{other_classes}"),
         "has other classes than the model"),
    Case("evaluate: --model is a PyTorch checkpoint", ("evaluate", "--model", "{ckpt}", "--data",
                                                       "{images}"), "convert it first"),
    Case("probe: data path missing", ("probe", "--model", "{teacher}", "--data", "{missing}"),
         "{missing} does not exist"),
    Case("probe: unknown --protocol", ("probe", "--model", "{teacher}", "--data", "{images}",
                                       "--protocol", "linear,svm"), "'svm' is not a protocol"),
    Case("probe: more --shots than a class has",
         ("probe", "--model", "{teacher}", "--data", "{images}", "--train-split", "test",
          "--shots", "3"), "class '0_c0' has 2 (and 3 more"),
    # embed
    Case("embed: classes file missing", ("embed", "--classes", "{missing}.txt", "--out",
                                         "{new_dir}/t.npy"), "{missing}.txt does not exist"),
    Case("embed: classes file empty", ("embed", "--classes", "{empty_classes}", "--out",
                                       "{new_dir}/t.npy"), "{empty_classes} is empty"),
    Case("embed: --out not .npy", ("embed", "--classes", "cifar10", "--out", "{new_dir}/t.txt"),
         "--out '{new_dir}/t.txt' must end in .npy"),
    # distill: flags and config files
    Case("distill: unknown --config name", ("distill", "--config", "nope", "--workdir",
                                            "{new_dir}"), "no installed config 'nope'"),
    Case("distill: config file that raises", ("distill", "--config", "{raising_config}",
                                              "--workdir", "{new_dir}"),
         "--config {raising_config}: loading it raised NameError (line 6)"),
    Case("distill: config file not Python", ("distill", "--config", "{not_python_config}",
                                             "--workdir", "{new_dir}"),
         "--config {not_python_config}: loading it raised SyntaxError"),
    Case("distill: --workdir missing", ("distill", "--config", "cifar10_resnet56_resnet20",
                                        "--config.teacher={teacher}"), "--workdir is required"),
    Case("distill: unknown field", (*DISTILL, "--config.nope=1"),
         "--config.nope: the config has no field 'nope'"),
    Case("distill: misspelt nested field", (*DISTILL, "--config.student.lrr=0.1"),
         "no field 'student.lrr' (did you mean 'student.lr'?)"),
    Case("distill: unknown flag", (*DISTILL, "--epochs=3"), "Unknown command line flag 'epochs'"),
    Case("distill: --workdir is a file", ("distill", "--config", "cifar10_resnet56_resnet20",
                                          "--workdir", "{a_file}", "--config.teacher={teacher}"),
         "--workdir {a_file} is a file"),
    Case("distill: wrong type", (*DISTILL, "--config.epochs=abc"), "--config.epochs=abc"),
    Case("distill: a word for a number", (*DISTILL, "--config.time_budget_minutes=half"),
         "--config.time_budget_minutes=half: the field takes a number"),
    Case("distill: --config forgotten", ("distill", "--workdir", "{new_dir}",
                                         "--config.teacher={teacher}"), "--config is missing"),
    Case("distill: --config path that does not exist",
         ("distill", "--config", "{new_dir}/mine.py", "--workdir", "{new_dir}"),
         "there is no file {new_dir}/mine.py"),
    # distill: files the config names
    Case("distill: teacher missing", (*DISTILL, "--config.teacher={missing}"),
         "{missing} is not a model bundle"),
    Case("distill: teacher of another arch than teacher_arch_expected",
         ("distill", "--config", "cifar10_resnet56_resnet20", "--workdir", "{new_dir}",
          "--config.teacher={teacher}", "--config.embeddings={table}"),
         "is a resnet_tiny_a, but this config is for a resnet56 teacher"),
    Case("distill: embedding table missing", (*DISTILL, "--config.embeddings={missing}.npy"),
         "{missing}.npy does not exist"),
    Case("distill: embedding table corrupt", (*DISTILL, "--config.embeddings={corrupt_table}"),
         "{corrupt_table} is not a plain .npy array"),
    Case("distill: table of other classes than the teacher",
         (*DISTILL, "--config.embeddings={other_table}"), "does not match the teacher's classes"),
    Case("distill: unknown student_arch", (*DISTILL, "--config.student_arch=resnet21"),
         "student_arch 'resnet21'"),
    Case("distill: eval_data missing", (*DISTILL, "--config.eval_data={missing}"),
         "{missing} does not exist"),
    Case("distill: eval_data of 3 classes", (*DISTILL, "--config.eval_data={three_classes}"),
         "config.eval_data='{three_classes}'"),
    Case("distill: eval_data's classes in another order than the teacher's",
         (*DISTILL, "--config.eval_data={shuffled_classes}"), "--config.eval_allow_class_mismatch"),
    Case("distill: teacher is a PyTorch checkpoint", (*DISTILL, "--config.teacher={ckpt}"),
         "convert it first"),
    # distill: values
    Case("distill: student.steps_per_call=0", (*DISTILL, "--config.student.steps_per_call=0"),
         "config.student.steps_per_call=0 must be positive"),
    Case("distill: student.lr=0", (*DISTILL, "--config.student.lr=0"),
         "config.student.lr=0.0 must be positive"),
    Case("distill: generator.life_epochs=0", (*DISTILL, "--config.generator.life_epochs=0"),
         "config.generator.life_epochs=0 must be positive"),
    Case("distill: eval_every_epochs=0", (*DISTILL, "--config.eval_every_epochs=0"),
         "config.eval_every_epochs=0 must be positive"),
    Case("distill: bank_capacity below one synthesis batch", (*DISTILL, "--config.bank_capacity=8"),
         "config.bank_capacity=8 is smaller than one synthesis batch"),
    Case("distill: unknown compute_dtype", (*DISTILL, "--config.compute_dtype=fp8"),
         "compute_dtype 'fp8'"),
    Case("distill: classes_per_group not a divisor of K", (*DISTILL, "--config.classes_per_group=3"),
         "config.classes_per_group=3 with the teacher's 4 classes"),
    Case("distill: no embedding table", (*DISTILL, "--config.embeddings="),
         "config.embeddings is empty"),
    # distill: resuming
    Case("distill: resume with a changed hyper-parameter", (*RESUME, "--config.student.lr=0.05"),
         "student.lr: 0.1 -> 0.05"),
    Case("distill: resume with another teacher", (*RESUME, "--config.teacher={other_teacher}"),
         "distilled from another teacher"),
    # file writers
    Case("export: --out exists, no --overwrite", ("export", "{teacher}", "--out", "{ckpt}"),
         "--out {ckpt} exists; pass --overwrite to replace it"),
    Case("export: --format disagrees with the suffix of --out",
         ("export", "{teacher}", "--format", "torch", "--out", "{new_dir}/w.safetensors"),
         "--format torch does not match --out {new_dir}/w.safetensors (a safetensors suffix)"),
    Case("export: --out is a directory", ("export", "{teacher}", "--format", "torch", "--out",
                                          "{empty_dir}"), "--out {empty_dir} is a directory"),
    Case("convert: --out is a file, no --overwrite",
         ("convert", "{ckpt}", "--arch", "resnet_tiny_a", "--num-classes", "4", "--out",
          "{a_file}"), "--out {a_file} exists; pass --overwrite to replace it"),
    Case("convert: --overwrite onto a file",
         ("convert", "{ckpt}", "--arch", "resnet_tiny_a", "--num-classes", "4", "--out",
          "{a_file}", "--overwrite"), "--out {a_file} is a file, not a bundle directory"),
    Case("embed: --out exists, no --overwrite", ("embed", "--classes", "cifar10", "--out",
                                                 "{table}"),
         "--out {table} exists; pass --overwrite to replace it"),
    Case("convert-diffusion: --out exists, no --overwrite",
         ("convert-diffusion", "{missing}", "--out", "{bundle}"),
         "--out {bundle} exists; pass --overwrite to replace it"),
    Case("convert-diffusion: --overwrite onto a folder that is no diffusion bundle",
         ("convert-diffusion", "{missing}", "--out", "{bundle}", "--overwrite"),
         "--out {bundle} is not a diffusion bundle"),
    # train
    Case("train: --config missing", ("train", "--workdir", "{new_dir}", "--config.data={images}"),
         "--config is missing"),
    Case("train: a distill config", ("train", "--config", "cifar10_resnet56_resnet20",
                                     "--workdir", "{new_dir}"), "is a config of `caedfkd distill`"),
    Case("train: unknown recipe", ("train", "--config", "train_cifar:resnet20,fast", "--workdir",
                                   "{new_dir}"), "the recipe 'fast' is not one of"),
    Case("train: no data", (*TRAIN[:5],), "config.data is empty"),
    Case("train: data missing", (*TRAIN[:5], "--config.data={missing}"), "{missing} does not exist"),
    Case("train: unknown arch", (*TRAIN, "--config.arch=resnet21"), "config.arch='resnet21'"),
    Case("train: batch larger than the train images", (*TRAIN, "--config.batch_size=128"),
         "config.batch_size=128 is more than the 4 train images"),
    Case("train: milestones past the last epoch", (*TRAIN, "--config.schedule=steps",
                                                   "--config.epochs=10"),
         "config.milestones=(80, 120, 160)"),
    # demo
    Case("demo: rerun with a changed --seed", ("demo", "--workdir", "{demo_dir}", "--seed", "1"),
         "--seed 0 -> 1"),
]


# ---------------------------------------------------------------------------
# Running.

def _env() -> dict[str, str]:
  """This environment, on the CPU, with one CPU device as a user has (not the 8 the test suite
  simulates: a distill run would compile for 8)."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = flags.strip()
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
  return env


def _run_cli(argv: list[str], timeout_s: float) -> tuple[int | None, str, str]:
  """(exit code or None at the timeout, stdout, stderr) of `python -m caedfkd_jax.cli.main argv`."""
  cmd = [sys.executable, "-m", "caedfkd_jax.cli.main", *argv]
  # Own process group: a timeout stops everything the command started.
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    return None, out, err
  return proc.returncode, out, err


def run_in_process(argv: list[str]) -> tuple[int | None, str, str]:
  """`caedfkd_jax.cli.main.main(argv)` here, stdout/stderr captured; an escaping exception is
  reported as the traceback a user would see. Cheaper than a process (no JAX start-up)."""
  import traceback
  from caedfkd_jax.cli import main
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = main.main(argv)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:  # noqa: BLE001 - what the user would get is the point
      traceback.print_exc()
      code = 1
  return code, out.getvalue(), err.getvalue()


_SUBSTITUTIONS: list[tuple[str, str]] = []  # (real path, placeholder), longest first


def _placeholders(text: str) -> str:
  for real, placeholder in _SUBSTITUTIONS:
    text = text.replace(real, placeholder)
  return text


def _new_dir(ws: Workspace, index: int) -> str:
  return os.path.join(ws.root, "new", f"{index:02d}")


def _register_paths(ws: Workspace, indices: list[int]) -> None:
  pairs = [(path, _PLACEHOLDER_OF[name]) for name, path in ws.paths.items()]
  pairs += [(_new_dir(ws, i), "NEW_DIR") for i in indices] + [(ws.root, "TMP")]
  for real, placeholder in list(pairs):
    pairs.append((os.path.realpath(real), placeholder))
  _SUBSTITUTIONS[:] = sorted(set(pairs), key=lambda p: -len(p[0]))


def display_command(case: Case, abbreviate: bool = True) -> str:
  """The case's command with placeholders and DISTILL/RESUME for their long prefixes."""
  argv = list(case.argv)
  prefix = ""
  for name, abbreviated in sorted(ABBREVIATIONS.items(), key=lambda kv: -len(kv[1])):
    if abbreviate and tuple(argv[:len(abbreviated)]) == abbreviated:
      prefix, argv = name, argv[len(abbreviated):]
      break
  shown = re.sub(r"\{(\w+)\}", lambda m: _PLACEHOLDER_OF.get(m.group(1), m.group(0)),
                 " ".join(argv))
  return (prefix + " " + shown).strip() if prefix else f"caedfkd {shown}"


def run_case(case: Case, ws: Workspace, index: int, timeout_s: float = 120,
             runner: Callable[[list[str]], tuple[int | None, str, str]] | None = None) -> Outcome:
  """Runs one case in a fresh process (or with `runner(argv)`), making its files first.

  The stderr lines keep their temp paths: `run_cases` puts placeholders in once all are made.
  """
  new_dir = _new_dir(ws, index)
  filled = dataclasses.replace(case, expect=ws.fill(case.expect, new_dir))
  argv = [ws.fill(a, new_dir) for a in case.argv]
  start = time.time()
  code, _, err = runner(argv) if runner else _run_cli(argv, timeout_s)
  lines = [line.rstrip() for line in err.splitlines() if line.strip()]
  return Outcome(filled, display_command(case), code, lines, time.time() - start)


def _fields(text: str) -> set[str]:
  return {field for _, field, _, _ in string.Formatter().parse(text) if field}


def run_cases(cases: list[Case], root: str, jobs: int = 2, timeout_s: float = 120,
              in_process: Callable[[Case], bool] = lambda case: False) -> list[Outcome]:
  """Runs the cases `jobs` at a time, making their files under `root`; in the order of `cases`.

  The cases that need RESUME_DIR (a distill run) go first, as one task: one worker makes it
  while the others run the rest. `in_process(case)` picks cases to run with `run_in_process`
  in this thread instead (cheaper, but it sees only what Python writes to sys.stderr).
  """
  ws = Workspace(root)
  indexed = list(enumerate(cases))
  local = [(i, c) for i, c in indexed if in_process(c)]
  remote = [(i, c) for i, c in indexed if not in_process(c)]
  slow = [(i, c) for i, c in remote if any("resume_dir" in _fields(t) for t in c.argv)]
  tasks = ([slow] if slow else []) + [[ic] for ic in remote if ic not in slow]

  def run_task(task):
    return [(i, run_case(c, ws, i, timeout_s)) for i, c in task]

  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    futures = [pool.submit(run_task, task) for task in tasks]
    outcomes = {i: run_case(c, ws, i, runner=run_in_process) for i, c in local}
    for future in futures:
      outcomes.update(future.result())
  if os.path.exists(ws.evil_marker()):
    raise RuntimeError("EVIL_CKPT was unpickled: a checkpoint ran code")
  _register_paths(ws, list(outcomes))
  for outcome in outcomes.values():
    outcome.lines = [_placeholders(line) for line in outcome.lines]
  return [outcomes[i] for i, _ in indexed]


def _cell(text: str) -> str:
  """`text` as a code span in a table cell: cut to MAX_SHOWN, | escaped, and two backticks
  around it where the message quotes a command in backticks itself."""
  text = text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + " …"
  text = text.replace("|", "\\|")
  return f"`` {text} ``" if "`" in text else f"`{text}`"


def what_the_user_gets(outcome: Outcome) -> str:
  lines = outcome.lines
  if outcome.code is None:
    return "(stopped at the timeout)"
  if not lines:
    return "(nothing on stderr)"
  if outcome.traceback:
    return f"a traceback ({len(lines)} lines) ending {_cell(lines[-1])}"
  if len(lines) > 1:
    return f"{len(lines)} lines: " + " ⏎ ".join(_cell(line) for line in lines)
  return _cell(lines[0])


def markdown_table(outcomes: list[Outcome]) -> str:
  rows = ["| input | command | exit | what the user gets |", "|---|---|---|---|"]
  for o in outcomes:
    code = "timeout" if o.code is None else str(o.code)
    rows.append(f"| {o.case.name} | {_cell(o.command)} | {code} | {what_the_user_gets(o)} |")
  return "\n".join(rows)


def legend(outcomes: list[Outcome]) -> str:
  used = set(re.findall(r"[A-Z][A-Z_]+", " ".join(o.command + " " + " ".join(o.lines)
                                                  for o in outcomes)))
  out = [f"- `{name}`: {text}" for name, text in LEGEND.items() if name in used]
  for name, argv in ABBREVIATIONS.items():
    if any(o.command.startswith(name + " ") or o.command == name for o in outcomes):
      base = display_command(Case("", argv, ""), abbreviate=False)
      out.append(f"- `{name}` = `{base}`")
  if any("TMP" in line for o in outcomes for line in o.lines):
    out.append("- `TMP`: the temp dir the files are made in")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="run only the cases whose command starts so "
                      "(convert, export, evaluate, probe, embed, distill, demo)")
  parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
  parser.add_argument("--timeout_s", type=float, default=120, help="per case")
  parser.add_argument("--keep", action="store_true", help="keep the temp dir of files")
  args = parser.parse_args(argv)
  cases = [c for c in CASES if c.argv[0].startswith(args.only)]
  root = tempfile.mkdtemp(prefix="caedfkd_bad_inputs_")
  start = time.time()
  try:
    outcomes = run_cases(cases, root, args.jobs, args.timeout_s)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  print(legend(outcomes) + "\n")
  print(markdown_table(outcomes))
  bad = [o for o in outcomes if not o.ok]
  print(f"\n{len(outcomes) - len(bad)} of {len(outcomes)} cases get their exit code and one line "
        f"naming the bad value, no traceback ({time.time() - start:.0f} s).", file=sys.stderr)
  for o in bad:
    print(f"  not yet: {o.case.name}", file=sys.stderr)
  if args.keep:
    print(f"files kept in {root}", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())

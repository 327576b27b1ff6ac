"""`caedfkd demo`: data-free distillation end to end, offline, in minutes on a CPU.

scikit-learn ships 1,797 real 8x8 handwritten digits. The demo trains a
ResNet-20 teacher on 80% of them, then distills it into a ResNet-8 with the
same CAE-DFKD engine, config fields and shipped embeddings as every other run
(the student never sees a real digit), and evaluates both on the held-out 20%.
"""

import argparse
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from caedfkd_jax import models
from caedfkd_jax.config import defaults, fields, ladder
from caedfkd_jax.engine import train
from caedfkd_jax.eval import evaluate, supervised
from caedfkd_jax.io import atomic_files, bundle as bundle_lib
from caedfkd_jax.methods import registry

IMAGE_SIZE = 16
DEMO_JSON = "demo.json"                      # the arguments the workdir's run was made with
OWN_DIRS = ("teacher", "heldout", "distill")  # what --fresh deletes
FULL_METHOD = "cend_cncl"                     # the ladder arm the demo runs by default
DEFAULT_METHOD = "cae_dfkd"                   # the method (caedfkd_jax/methods/) it runs by default
# The methods the offline demo can run: not those that need more than a teacher (DiffDFKD's
# Stable Diffusion weights).
DEMO_METHODS = [name for name in registry.names() if not registry.get(name).requires]
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digits(seed: int = 0):
  """Digits upsampled to 16x16 RGB in [0, 1]; a stratified 80/20 split."""
  from sklearn.datasets import load_digits as sk_load_digits
  from sklearn.model_selection import train_test_split
  digits = sk_load_digits()
  images = digits.images.astype(np.float32) / 16.0                       # N x 8 x 8
  images = np.asarray(jax.image.resize(images, (len(images), IMAGE_SIZE, IMAGE_SIZE), "bilinear"))
  images = np.repeat(np.clip(images, 0, 1)[..., None], 3, axis=-1)
  return train_test_split(images, digits.target.astype(np.int32), test_size=0.2,
                          random_state=seed, stratify=digits.target)


def teacher_spec() -> bundle_lib.ModelSpec:
  """The demo teacher: a ResNet-20 on 16x16 RGB digits."""
  return bundle_lib.ModelSpec("resnet20", 10, IMAGE_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3,
                              class_names=DIGIT_NAMES, extra={"trained_on": "sklearn digits (80%)"})


def train_teacher(x_train, y_train, spec: bundle_lib.ModelSpec, epochs: int, seed: int):
  """Plain supervised training (SGD, cosine, crop+flip-free: digits are not mirror-symmetric)."""
  model = models.create_model(spec.arch, spec.num_classes)
  variables = jax.tree.map(jnp.array, bundle_lib.init_variables(spec, seed))  # the step donates
  batch = 128
  steps_per_epoch = len(x_train) // batch
  tx = supervised.optimizer(0.1, 0.9, 5e-4, epochs * steps_per_epoch)
  opt_state = tx.init(variables["params"])
  step = supervised.make_step(model, tx, spec.mean, spec.std, padding=None)  # float images in [0, 1]

  rng = np.random.default_rng(seed)
  for _ in tqdm(range(epochs), desc="teacher", unit="epoch"):
    order = rng.permutation(len(x_train))
    for i in range(steps_per_epoch):
      idx = order[i * batch:(i + 1) * batch]
      variables, opt_state, _ = step(variables, opt_state, x_train[idx], y_train[idx], None)
  return variables


def write_image_folder(root: str, images01, labels, class_names) -> str:
  """The held-out split as `root/test/<k>_<class>/NNNN.png`, the layout `--data` reads.

  The index prefix keeps the folders' sorted order equal to the label order.
  """
  for i, (img, label) in enumerate(zip(images01, labels)):
    d = os.path.join(root, "test", f"{label}_{class_names[label]}")
    os.makedirs(d, exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(os.path.join(d, f"{i:04d}.png"))
  return root


# The digits' sizes for the fields of the synthesis methods; a method gets those it reads.
DIGITS = {
    "embeddings": "digits",
    # NAYER's weights (CE 0.5, BN 10) let the BN term swamp the class signal on this small
    # teacher: the teacher took most synthetic digits for another class (docs/results.md,
    # "The generator's loss weights").
    "loss.ce": 1.0, "loss.bn": 1.0,
    "num_groups": 2,                     # 2 x 10 x 5 = 100 synthetic digits per round.
    "generator.steps": 20, "generator.ngf": 32,
    "warmup_epochs": 1, "warmup_g_loops": 5, "g_loops": 2,
    "student.batch_groups": 2,           # 100-image KD batches.
    "student.kd_steps": 40, "student.steps_per_call": 20,
}


def demo_config(teacher_dir: str, eval_dir: str, minutes: float, method: str = DEFAULT_METHOD,
                arm: str = FULL_METHOD):
  """The config of `method` sized for digits on 2 CPU cores: the digits' sizes of the fields it
  reads, its own `quick` sizes, and (for cae_dfkd) a rung of the ablation ladder."""
  config = defaults.get_config(method)
  config.teacher = teacher_dir
  config.student_arch = "resnet8"
  config.epochs = 30
  config.eval_data = eval_dir
  config.eval_every_epochs = 1
  config.time_budget_minutes = minutes
  config.checkpoint_every_minutes = 2.0
  chosen = registry.get(method)
  fields.set_fields(config, {k: v for k, v in DIGITS.items() if chosen.reads_field(k)})
  if method == DEFAULT_METHOD:
    ladder.apply_arm(config, arm)
  elif arm != FULL_METHOD:
    raise ValueError(f"--arm {arm} is a rung of CAE-DFKD's ablation ladder: it applies to "
                     f"--method {DEFAULT_METHOD} only (--method {method} runs that method as is).")
  return fields.set_fields(config, dict(chosen.quick))


def plot_accuracy(metrics_path: str, teacher_top1: float, out_png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = []
  if os.path.exists(metrics_path):  # absent or empty when the run stopped in its first epoch
    with open(metrics_path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if "eval/top1" in r]
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
  ax.plot([r["time/minutes"] for r in rows], [r["eval/top1"] for r in rows], "o-", label="student")
  if not rows:
    ax.text(0.5, 0.5, "no evaluation yet: rerun with a larger --minutes", ha="center",
            transform=ax.transAxes)
  ax.axhline(teacher_top1, color="gray", ls="--", label="teacher")
  ax.set_xlabel("minutes of distillation")
  ax.set_ylabel("top-1 on held-out digits (%)")
  ax.set_ylim(0, 100)
  ax.legend(loc="lower right")
  ax.set_title("CAE-DFKD on digits: the student sees no real image", fontsize=9)
  fig.tight_layout()
  fig.savefig(out_png)
  plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", default="caedfkd_demo",
                      help="where everything is written: teacher/, heldout/, distill/ and the "
                           "plot (default: caedfkd_demo); a rerun with the same arguments resumes")
  parser.add_argument("--minutes", type=float, default=3.0,
                      help="distillation time budget in minutes (default: 3); rerun with a "
                           "larger one to continue a run")
  parser.add_argument("--teacher-epochs", type=int, default=30,
                      help="epochs of the digits teacher's supervised training (default: 30)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seeds the digits split, the teacher and the distillation (default: 0)")
  parser.add_argument("--arm", choices=list(ladder.ARMS), default=FULL_METHOD,
                      help="an arm of CAE-DFKD's ablation ladder (docs/methods.md, 'The "
                           f"ablation ladder'), with --method {DEFAULT_METHOD}; default "
                           f"{FULL_METHOD}, the full method")
  skipped = [f"{n} (it needs {registry.get(n).requires})" for n in registry.names()
             if n not in DEMO_METHODS]
  parser.add_argument("--method", choices=DEMO_METHODS, default=DEFAULT_METHOD,
                      help=f"the DFKD method (caedfkd_jax/methods/); default {DEFAULT_METHOD}"
                           + (f". Not {', '.join(skipped)}" if skipped else ""))
  parser.add_argument("--fresh", action="store_true",
                      help="delete the demo's earlier teacher/, heldout/ and distill/ in --workdir "
                           "and start over (by default a rerun with the same arguments resumes)")


def _recorded_arguments(args: argparse.Namespace) -> dict[str, int | str]:
  """What the workdir's contents depend on; --minutes is only the time budget, free to grow.

  --arm and --method are recorded only when not the defaults, so runs made before they existed
  resume.
  """
  recorded = {"teacher_epochs": args.teacher_epochs, "seed": args.seed}
  if args.arm != FULL_METHOD:
    recorded["arm"] = args.arm
  if getattr(args, "method", DEFAULT_METHOD) != DEFAULT_METHOD:
    recorded["method"] = args.method
  return recorded


def prepare_workdir(workdir: str, args: argparse.Namespace) -> None:
  """Resumes an earlier run only if it had the same arguments, so a changed one is never ignored.

  Writes `demo.json` (the arguments) before anything else, so even a killed run is recognised.
  """
  record = os.path.join(workdir, DEMO_JSON)
  ours = [os.path.join(workdir, d) for d in OWN_DIRS]
  wanted = _recorded_arguments(args)
  if args.fresh:
    for d in ours:
      shutil.rmtree(d, ignore_errors=True)
  elif os.path.exists(record):
    with open(record) as f:
      try:
        recorded = json.load(f)
      except json.JSONDecodeError:
        recorded = {}
    with_arm = lambda d: {**d, "arm": d.get("arm", FULL_METHOD),
                          "method": d.get("method", DEFAULT_METHOD)}
    recorded, full = with_arm(recorded), with_arm(wanted)
    changed = [f"--{k.replace('_', '-')} {recorded.get(k)} -> {v}"
               for k, v in full.items() if recorded.get(k) != v]
    if changed:
      raise ValueError(
          f"--workdir {workdir} holds a demo run with other arguments ({', '.join(changed)}); "
          "pass --fresh to delete that run and start over, or use another --workdir.")
  elif any(os.path.exists(d) for d in ours):
    raise ValueError(
        f"--workdir {workdir} holds a demo run whose arguments were not recorded; pass --fresh "
        "to delete that run and start over, or use another --workdir.")
  os.makedirs(workdir, exist_ok=True)
  atomic_files.write_text(record, json.dumps(wanted, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
  start = time.time()
  workdir = os.path.abspath(args.workdir)
  prepare_workdir(workdir, args)
  x_train, x_test, y_train, y_test = load_digits(args.seed)
  print(f"digits: {len(x_train)} training images for the teacher, {len(x_test)} held out")

  spec = teacher_spec()
  teacher_dir = os.path.join(workdir, "teacher")
  if not os.path.exists(os.path.join(teacher_dir, bundle_lib.MODEL_JSON)):
    variables = train_teacher(x_train, y_train, spec, args.teacher_epochs, args.seed)
    bundle_lib.save_bundle(teacher_dir, spec, variables)
  teacher = bundle_lib.load_bundle(teacher_dir)
  eval_dir = write_image_folder(os.path.join(workdir, "heldout"), x_test, y_test, DIGIT_NAMES)

  def top1(b):
    logits = evaluate.predict(b.model, b.variables, (x_test * 255).round().astype(np.uint8),
                              b.spec.mean, b.spec.std, 512, progress=False)
    return float(np.mean(np.argmax(logits, -1) == y_test) * 100)

  teacher_top1 = top1(teacher)
  print(f"teacher (resnet20, trained on real digits): {teacher_top1:.2f}% on held-out digits")

  config = demo_config(teacher_dir, eval_dir, args.minutes, getattr(args, "method", DEFAULT_METHOD),
                       args.arm)
  config.seed = args.seed
  result = train.train_and_evaluate(config, os.path.join(workdir, "distill"))
  student_top1 = top1(bundle_lib.load_bundle(result["student"]))
  plot = os.path.join(workdir, "student_accuracy.png")
  plot_accuracy(os.path.join(workdir, "distill", "metrics.jsonl"), teacher_top1, plot)
  samples_dir = os.path.join(workdir, "distill", "samples")
  samples = sorted(os.listdir(samples_dir)) if os.path.isdir(samples_dir) else []

  print("\n| model | data seen | top-1 on held-out digits |")
  print("|---|---|---|")
  print(f"| teacher resnet20 ({_params(teacher.variables)} params) | real digits | {teacher_top1:.2f}% |")
  print(f"| student resnet8 ({_params(bundle_lib.load_bundle(result['student']).variables)} params) "
        f"| synthetic only | {student_top1:.2f}% |")
  if samples:
    print(f"\nsynthetic digits: {os.path.join(samples_dir, samples[-1])}")
  else:  # --minutes ran out before the first epoch (the warm-up) ended
    print("\nsynthetic digits: none saved yet (the time ran out in the first epoch); rerun with "
          "a larger --minutes to continue the run")
  print(f"accuracy plot:    {plot}")
  print(f"student bundle:   {result['student']}")
  print(f"total time: {(time.time() - start) / 60:.1f} min")
  return 0


def _params(variables) -> str:
  return f"{sum(x.size for x in jax.tree.leaves(variables['params'])) / 1e3:.0f}k"

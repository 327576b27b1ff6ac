r"""Round by round: NAYER's own synthesizer against caedfkd-jax's generator rounds, same teacher.

Both sides start from a fresh generator and run `--rounds` warm-up rounds (NAYER's
warm-up: generator only, no student, no adversarial term) of `generator.steps` Adam
steps on one synthesis batch, with the config's batch, loss weights, learning rate
and BN-statistics momentum, the BN EMA carried from round to round as both codes do.
NAYER's side is its own `datafree.synthesis.NAYER` and `NLGenerator`, imported from a
checkout (never copied here), driven one `synthesize()` per round; its teacher is the
config's teacher bundle converted back to PyTorch (`caedfkd_jax.io.torch_zoo`).

One judge (`synthesis_judge.py`) scores every round's kept (best) batch of both sides alike: the
PyTorch teacher on the unaugmented images gives the cross-entropy against the
intended classes, top-1 against them, the mean confidence, the share the teacher is
confident about (>= config.low_confidence) yet wrong, and the raw BN-statistics loss
(sum over BN layers of ||var - running_var|| + ||mean - running_mean||, no EMA). Each
side's own per-step losses (first and last step of the round) are kept beside: NAYER's
from the line it prints every step, ours from the step metrics.

  python -m benchmarks.nayer_parity --config configs/cifar10_resnet56_resnet20.py \
      --config.teacher=teachers/resnet56 --config.cend.mode=clean \
      --config.embeddings=../shared/data/embeddings/cifar10_clip_vitb32.npy \
      --nayer_path ~/src/NAYER --rounds 8 --seeds 0,1,2 --out_dir runs/nayer_parity

NAYER's synthesizer needs torch, torchvision and kornia (and the packages its
`datafree` imports: termcolor, xlsxwriter, pandas) in this interpreter. `--sides jax` runs
ours alone. Writes parity.json (every figure, per side, seed and round), a markdown
table of mean and spread over seeds per round, and the last round's kept batch of
each side as a labelled grid (seed 0).
"""

import contextlib
import io
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from benchmarks.synthesis_judge import judge, torch_teacher

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, as for `caedfkd distill`.")
_NAYER_PATH = flags.DEFINE_string("nayer_path", None, "A checkout of github.com/tmtuan1307/NAYER.")
_ROUNDS = flags.DEFINE_integer("rounds", 8, "Generator rounds per side and seed.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run per side each.")
_SIDES = flags.DEFINE_list("sides", ["jax", "nayer"], "jax (caedfkd-jax) and/or nayer (its code).")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/nayer_parity", "Where the JSON and grids go.")

# NAYER prints "<step> - bn <bn * weight> - bn <bn> - oh <ce> - adv <adv>" every generator step.
_STEP_LINE = re.compile(r"^(\d+) - bn tensor\(([-\d.e+]+).*? - bn tensor\(([-\d.e+]+).*? - oh "
                        r"tensor\(([-\d.e+]+)")


def jax_rounds(config, bundle, table, rounds: int, seed: int):
  """caedfkd-jax's warm-up rounds, step by step as `caedfkd distill` runs them on a CPU."""
  import jax
  from benchmarks import jax_side
  from caedfkd_jax.synthesis import memory_bank
  from caedfkd_jax.engine import steps, train
  config = config.copy_and_resolve_references()
  config.seed = seed
  setup, mesh, replicated, teacher_vars = jax_side.prepare(config, bundle, table)
  state = jax.device_put(train.create_state(setup, teacher_vars), replicated)
  round_fn = steps.make_step_fns(setup, mesh, fuse=False)["warmup_round"]
  for _ in range(rounds):
    state, metrics, outputs = round_fn(state, teacher_vars)
    best = outputs["images"]
    ce, bn = np.asarray(metrics["gen/ce"]), np.asarray(metrics["gen/bn"])
    _, labels = memory_bank.latest(state.method.bank, setup.synthesis_batch)  # this round's batch
    yield np.asarray(best), np.asarray(labels), {"step_ce": [float(ce[0]), float(ce[-1])],
                                           "step_bn": [float(bn[0]), float(bn[-1])]}


def nayer_rounds(nayer_path: str, config, bundle, table, rounds: int, seed: int):
  """NAYER's own synthesizer, one `synthesize()` (one warm-up round) at a time."""
  import torch
  from benchmarks import nayer_side
  datafree, _ = nayer_side.import_nayer(nayer_path)
  torch.manual_seed(seed)
  np.random.seed(seed)
  random.seed(seed)
  spec = bundle.spec
  k, d = table.vectors.shape
  batch = config.num_groups * k * (config.cend.num_sources + 1)
  g = config.generator
  teacher = torch_teacher(bundle)
  student = torch_teacher(bundle)  # NAYER needs one; its warm-up never uses it.
  label_emb = torch.as_tensor(table.vectors, dtype=torch.float32)
  generator = datafree.models.generator.NLGenerator(
      ngf=g.ngf, img_size=spec.image_size, nc=3, nl=k, label_emb=label_emb, le_emb_size=g.noise_dim,
      le_size=d, sbz=batch)
  normalizer = datafree.utils.Normalizer(mean=spec.mean, std=spec.std)
  log = io.StringIO()
  with nayer_side.cuda_calls_on_cpu(), tempfile.TemporaryDirectory() as pool_dir:
    with contextlib.redirect_stdout(log):
      # warmup=10**6: every round is a warm-up round (gwp_loops = 1 round per call, adv off);
      # g_life=10**6: the generator is made once, at the first call, and never again.
      synthesizer = datafree.synthesis.NAYER(
          teacher, student, generator, num_classes=k, img_size=(3, spec.image_size, spec.image_size),
          save_dir=pool_dir, device=torch.device("cpu"), transform=None, normalizer=normalizer,
          synthesis_batch_size=batch, sample_batch_size=batch, g_steps=g.steps, warmup=10**6,
          lr_g=g.lr, adv=config.loss.adv, bn=config.loss.bn, oh=config.loss.ce,
          bn_mmt=config.loss.bn_momentum, g_life=10**6, g_loops=1, gwp_loops=1)
    for _ in range(rounds):
      log.seek(0)
      log.truncate()
      with contextlib.redirect_stdout(log):
        out, *_ = synthesizer.synthesize()
      steps_logged = [m.groups() for m in map(_STEP_LINE.match, log.getvalue().splitlines()) if m]
      if len(steps_logged) != g.steps:
        raise RuntimeError(f"expected {g.steps} step lines from NAYER's synthesize(), parsed "
                           f"{len(steps_logged)}: its print format changed?\n{log.getvalue()[:500]}")
      best = out["synthetic"][0].detach().numpy().transpose(0, 2, 3, 1)
      # NAYER's generate_ys: with a batch a multiple of K, the labels 0..K-1 repeated.
      labels = np.tile(np.arange(k), batch // k)
      first, last = steps_logged[0], steps_logged[-1]
      yield best, labels, {"step_ce": [float(first[3]), float(last[3])],
                           "step_bn": [float(first[2]), float(last[2])]}


def summary_table(results: dict[str, Any], rounds: int) -> str:
  """Markdown: per round, mean +- sample std over seeds of each judged figure, side by side."""
  sides = list(results)
  header = ["round"] + [f"{side} {name}" for name in ("top-1", "CE", "conf. wrong", "BN")
                        for side in sides]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

  def cell(side, r, key, fmt):
    values = [run["rounds"][r][key] for run in results[side]]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(spread)}"

  for r in range(rounds):
    cells = [str(r + 1)]
    for key, fmt in (("top1", "{:.2f}"), ("ce", "{:.2f}"), ("confident_wrong", "{:.2f}"),
                     ("bn", "{:.1f}")):
      cells += [cell(side, r, key, fmt) for side in sides]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main(argv):
  del argv
  from caedfkd_jax.io import bundle as bundle_lib
  from caedfkd_jax.io import embeddings
  from caedfkd_jax.engine import metrics_writer
  config = _CONFIG.value
  if not config.teacher:
    raise app.UsageError("--config.teacher: a teacher bundle is needed (the parity is about a "
                         "real teacher; `caedfkd convert` makes one).")
  if "nayer" in _SIDES.value and not _NAYER_PATH.value:
    raise app.UsageError("--sides nayer needs --nayer_path=PATH of a NAYER checkout.")
  if config.cend.mode != "clean":
    print(f"note: cend.mode={config.cend.mode!r}; NAYER's side always uses the clean table, so "
          "only --config.cend.mode=clean compares like with like.", file=sys.stderr)
  bundle = bundle_lib.load_bundle(config.teacher)
  table = embeddings.load_table(config.embeddings)
  spec = bundle.spec
  teacher = torch_teacher(bundle)
  class_names = list(spec.class_names or table.classes)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  results: dict[str, list] = {}
  for side in _SIDES.value:
    results[side] = []
    for seed in map(int, _SEEDS.value):
      start = time.perf_counter()
      gen = (jax_rounds(config, bundle, table, _ROUNDS.value, seed) if side == "jax" else
             nayer_rounds(_NAYER_PATH.value, config, bundle, table, _ROUNDS.value, seed))
      run = {"seed": seed, "rounds": []}
      for r, (best, labels, own) in enumerate(gen):
        verdict = judge(teacher, best, labels, spec.mean, spec.std, config.low_confidence)
        predicted, confidence = verdict.pop("predicted"), verdict.pop("confidence_B")
        run["rounds"].append({**verdict, **own})
        print(f"{side} seed {seed} round {r + 1}: top-1 {verdict['top1']:.2f} CE {verdict['ce']:.2f} "
              f"confident-wrong {verdict['confident_wrong']:.2f} BN {verdict['bn']:.1f} "
              f"(own steps: CE {own['step_ce'][0]:.2f}->{own['step_ce'][1]:.2f}, BN "
              f"{own['step_bn'][0]:.1f}->{own['step_bn'][1]:.1f})", flush=True)
        if seed == int(_SEEDS.value[0]) and r == _ROUNDS.value - 1:
          metrics_writer.save_image_grid(
              os.path.join(_OUT_DIR.value, f"{side}_last_round.png"), best, labels,
              spec.num_classes, per_class=8, class_names=class_names, predicted_B=predicted,
              confidence_B=confidence)
      run["seconds"] = time.perf_counter() - start
      results[side].append(run)
      out = {"command": " ".join(sys.argv), "rounds": _ROUNDS.value,
             "config": json.loads(config.to_json()), "results": results}
      with open(os.path.join(_OUT_DIR.value, "parity.json"), "w") as f:
        json.dump(out, f, indent=1)
  table_md = summary_table(results, _ROUNDS.value)
  with open(os.path.join(_OUT_DIR.value, "parity.md"), "w") as f:
    f.write(table_md + "\n")
  print(table_md)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)

r"""Round by round: NAYER's own synthesizer against caedfkd-jax's generator rounds, same teacher.

Warm-up only (the default, `--epochs 0`): both sides start from a fresh generator and run
`--warmup_rounds` (alias `--rounds`) warm-up rounds (NAYER's warm-up: generator only, no
student, no adversarial term) of `generator.steps` Adam steps on one synthesis batch, with the
config's batch, loss weights, learning rate and BN-statistics momentum, the BN EMA carried from
round to round as both codes do. NAYER's side is its own `datafree.synthesis.NAYER` and
`NLGenerator`, imported from a checkout (never copied here), driven one `synthesize()` per
round; its teacher is the config's teacher bundle converted back to PyTorch
(`caedfkd_jax.io.torch_zoo`).

  python -m benchmarks.nayer_parity --config configs/cifar10_resnet56_resnet20.py \
      --config.teacher=teachers/resnet56 --config.cend.mode=clean \
      --config.embeddings=../shared/data/embeddings/cifar10_clip_vitb32.npy \
      --nayer_path ~/src/NAYER --rounds 8 --seeds 0,1,2 --out_dir runs/nayer_parity

Beyond the warm-up (`--epochs E > 0`): NAYER's schedule, `--warmup_rounds W` warm-up epochs
of one round each, then E epochs of `--rounds_per_epoch R` rounds (NAYER's `g_loops`: its
rounds per `synthesize()`; `--g_loops` is the same flag's NAYER name), the adversarial term on
(config `loss.adv`), the generator renewed where NAYER's g_life schedule says
(`generator.life_epochs`, so also when the warm-up ends). Every side holds the same student: a
fresh random-init `student_arch` of our Flax zoo (per seed), converted to PyTorch for NAYER.
No KD step runs (its weights stay fixed): what is compared is how the rounds treat the student.
NAYER's `synthesize()` itself calls `student.eval()` when it starts (nayer.py:149) and
`student.train()` after each round (nayer.py:225), so an epoch's second round on runs L_adv
with the student's batch statistics and moves its running ones; its `datafree_kd.py` then
calls `student.train()` in its KD `train()` (here with no KD steps) and `student.eval()` before
evaluating, both reproduced between epochs. Our side runs twice: `jax_eval`
(`student_train_mode_in_rounds=False`, the paper's reading, our default) and `jax_train`
(True, NAYER's code); `jax` keeps the config's own value.

  python -m benchmarks.nayer_parity --config configs/cifar10_resnet56_resnet20.py \
      --config.teacher=runs/teachers/resnet56 --config.cend.mode=clean \
      --config.embeddings=../shared/data/embeddings/cifar10_clip_vitb32.npy \
      --nayer_path /work/nayer_src --sides jax_eval,jax_train,nayer --seeds 0,1,2 \
      --warmup_rounds 2 --epochs 2 --rounds_per_epoch 2 --out_dir runs/nayer_parity_post

One judge (`synthesis_judge.py`) scores every round's kept (best) batch of every side alike:
the PyTorch teacher on the unaugmented images gives the cross-entropy against the intended
classes, top-1 against them, the mean confidence, the share the teacher is confident about
(>= config.low_confidence) yet wrong, and the raw BN-statistics loss (sum over BN layers of
||var - running_var|| + ||mean - running_mean||, no EMA). Each side's own per-step losses
(first and last step of the round) are kept beside: NAYER's from the line it prints every step,
ours from the step metrics; beyond the warm-up also L_adv (unweighted) and the student's
BN drift over the round: sum over its BN layers of ||running_mean after - before|| +
||running_var after - before|| (0 in eval mode), and on NAYER's side the share of the
student's forward passes it ran in train mode (observed with a hook).

NAYER's synthesizer needs torch, torchvision and kornia (and the packages its `datafree`
imports: termcolor, xlsxwriter, pandas) in this interpreter; nothing of it is imported
before a NAYER side runs. `--sides jax` runs ours alone. Writes parity.json (every figure,
per side, seed and round), parity.md (judged figures per round, mean and spread over seeds),
beyond the warm-up parity_post_warmup.md (one table per post-warm-up round, every figure,
sides side by side), and the last round's kept batch of each side as a labelled grid (seed 0).
"""

import contextlib
import dataclasses
import functools
import io
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Iterator

import numpy as np

from benchmarks.synthesis_judge import judge, torch_teacher

# NAYER prints "<step> - bn <bn * weight> - bn <bn> - oh <ce> - adv <adv * weight>" every
# generator step; adv is "tensor([0.])" where the adversarial term is off.
_STEP_LINE = re.compile(r"^(\d+) - bn tensor\(([-\d.e+]+).*? - bn tensor\(([-\d.e+]+).*? - oh "
                        r"tensor\(([-\d.e+]+)(?:.*? - adv tensor\(\[?([-\d.e+]+))?")
# Our sides: the value of `student_train_mode_in_rounds` each sets (None: the config's own).
JAX_SIDES = {"jax": None, "jax_eval": False, "jax_train": True}
SIDES = (*JAX_SIDES, "nayer")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Which rounds run. `epochs` 0: `warmup_rounds` warm-up rounds in one go (today's parity).
  Else NAYER's loop: `warmup_rounds` warm-up epochs of one round (gwp_loops 1), then `epochs`
  epochs of `rounds_per_epoch` rounds (g_loops), the student in the post-warm-up ones."""
  warmup_rounds: int
  epochs: int = 0
  rounds_per_epoch: int = 1

  @property
  def post_warmup(self) -> bool:
    return self.epochs > 0

  def rounds(self) -> list[tuple[int, int, bool]]:
    """(epoch, round within the epoch, warm-up?) of every round, in order."""
    if not self.post_warmup:
      return [(0, r, True) for r in range(self.warmup_rounds)]
    return ([(e, 0, True) for e in range(self.warmup_rounds)] +
            [(self.warmup_rounds + e, r, False) for e in range(self.epochs)
             for r in range(self.rounds_per_epoch)])

  def calls(self) -> list[list[tuple[int, int, bool]]]:
    """The rounds of each of NAYER's `synthesize()` calls (one an epoch; warm-up only: one a
    round, as today's parity drives it); our side runs the same groups, one epoch each."""
    if not self.post_warmup:
      return [[r] for r in self.rounds()]
    return [[r for r in self.rounds() if r[0] == e] for e in range(self.warmup_rounds + self.epochs)]

  def label(self, epoch: int, unit: int, warmup: bool) -> str:
    if not self.post_warmup:
      return str(unit + 1)
    return (f"warm-up {epoch + 1}" if warmup else
            f"epoch {epoch - self.warmup_rounds + 1} round {unit + 1}")


def bn_drift(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
  """Sum over BN layers of ||mean after - before|| + ||var after - before||; `before` and
  `after` hold one entry per layer's mean and one per its var, keyed alike."""
  return float(sum(np.linalg.norm(np.asarray(after[k], np.float64) - np.asarray(before[k], np.float64))
                   for k in before))


def _flax_bn_stats(batch_stats) -> dict[str, np.ndarray]:
  """A Flax student's running statistics, host copies keyed by path."""
  import jax
  from flax import traverse_util
  flat = traverse_util.flatten_dict(jax.device_get(batch_stats))
  return {"/".join(k): np.array(v) for k, v in flat.items()}


def _torch_bn_stats(module) -> dict[str, np.ndarray]:
  """A PyTorch student's running statistics, host copies keyed by module path."""
  import torch
  stats = {}
  for name, m in module.named_modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      stats[f"{name}/mean"] = m.running_mean.detach().numpy().copy()
      stats[f"{name}/var"] = m.running_var.detach().numpy().copy()
  return stats


def fresh_student(config, num_classes: int, image_size: int, seed: int) -> dict[str, Any]:
  """The one student every side holds for `seed`: random init of `config.student_arch`."""
  from caedfkd_jax.io import bundle as bundle_lib
  spec = bundle_lib.ModelSpec(config.student_arch, num_classes, image_size)
  return bundle_lib.init_variables(spec, seed)


def jax_rounds(config, bundle, table, seed: int, schedule: Schedule,
               student: dict[str, Any] | None = None, train_mode: bool | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
  """caedfkd-jax's rounds, step by step as `caedfkd distill` runs them on a CPU, KD units left
  out. Yields (kept batch, its labels, own figures) per round. `student`: the state's student
  (default: the run's own); `train_mode`: `student_train_mode_in_rounds` (None: the config's)."""
  import jax
  import jax.numpy as jnp
  from benchmarks import jax_side
  from caedfkd_jax.synthesis import memory_bank
  from caedfkd_jax.engine import steps, train
  config = config.copy_and_resolve_references()
  config.seed = seed
  if train_mode is not None:
    config.student_train_mode_in_rounds = train_mode
  if schedule.post_warmup:   # The engine's own epoch plan and g_life schedule, NAYER's numbers.
    config.warmup_epochs = schedule.warmup_rounds
    config.warmup_g_loops = 1
    config.g_loops = schedule.rounds_per_epoch
    config.epochs = schedule.warmup_rounds + schedule.epochs
  setup, mesh, replicated, teacher_vars = jax_side.prepare(config, bundle, table)
  state = train.create_state(setup, teacher_vars)
  if student is not None:   # A copy: the rounds donate the state's buffers.
    state = state.replace(student=jax.tree.map(np.array, student))
  state = jax.device_put(state, replicated)
  fns = steps.make_step_fns(setup, mesh, fuse=False)
  method = setup.method
  renew = method.renew and jax.jit(functools.partial(method.renew, setup))
  for this_call in schedule.calls():   # Beyond the warm-up: one epoch's rounds.
    epoch = this_call[0][0]
    if schedule.post_warmup and renew and method.renews(config, epoch):
      state = renew(state)
    for _, unit, warmup in this_call:
      name = "warmup_round" if warmup else "round"
      if schedule.post_warmup:   # The unit the engine's epoch plan runs here.
        assert method.epoch_plan(config, epoch)[unit] == name, (epoch, unit)
      before = _flax_bn_stats(state.student["batch_stats"])   # The round donates its state.
      state, metrics, outputs = fns[name](state, teacher_vars)
      best = outputs["images"]
      ce, bn, adv = (np.asarray(metrics[k]) for k in ("gen/ce", "gen/bn", "gen/adv"))
      _, labels = memory_bank.latest(state.method.bank, setup.synthesis_batch)  # this round's batch
      own = {"step_ce": [float(ce[0]), float(ce[-1])], "step_bn": [float(bn[0]), float(bn[-1])],
             "step_adv": None if warmup else [float(adv[0]), float(adv[-1])],
             "bn_drift": bn_drift(before, _flax_bn_stats(state.student["batch_stats"])),
             "student_train_share": None}
      yield np.asarray(best), np.asarray(labels), own
    if schedule.post_warmup:   # train.end_epoch's step to the next epoch.
      state = state.replace(epoch=state.epoch + 1, unit=jnp.zeros_like(state.unit))


def nayer_rounds(nayer_path: str, config, bundle, table, seed: int, schedule: Schedule,
                 student: dict[str, Any] | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
  """NAYER's own synthesizer, one `synthesize()` (one epoch's rounds) at a time, with
  `datafree_kd.py`'s student.train() / student.eval() between epochs. `student`: our Flax
  variables (converted here); None (warm-up only): a copy of the teacher, never run."""
  import torch
  from benchmarks import nayer_side
  from caedfkd_jax.io import bundle as bundle_lib
  datafree, _ = nayer_side.import_nayer(nayer_path)
  torch.manual_seed(seed)
  np.random.seed(seed)
  random.seed(seed)
  spec = bundle.spec
  k, d = table.vectors.shape
  batch = config.num_groups * k * (config.cend.num_sources + 1)
  g = config.generator
  teacher = torch_teacher(bundle)
  if student is None:
    student_net = torch_teacher(bundle)  # NAYER needs one; its warm-up never uses it.
  else:  # Weights frozen (no KD here); BatchNorm still moves its running statistics.
    student_net = torch_teacher(bundle_lib.Bundle(
        bundle_lib.ModelSpec(config.student_arch, k, spec.image_size), student))
  label_emb = torch.as_tensor(table.vectors, dtype=torch.float32)
  generator = datafree.models.generator.NLGenerator(
      ngf=g.ngf, img_size=spec.image_size, nc=3, nl=k, label_emb=label_emb, le_emb_size=g.noise_dim,
      le_size=d, sbz=batch)
  normalizer = datafree.utils.Normalizer(mean=spec.mean, std=spec.std)
  if schedule.post_warmup:   # NAYER's schedule: adv on and g_loops rounds after `warmup` calls.
    warmup, g_life, g_loops = schedule.warmup_rounds, g.life_epochs, schedule.rounds_per_epoch
  else:
    # warmup=10**6: every round is a warm-up round (gwp_loops = 1 round per call, adv off);
    # g_life=10**6: the generator is made once, at the first call, and never again.
    warmup, g_life, g_loops = 10**6, 10**6, 1
  modes: list[bool] = []   # student.training at each of its forward passes (L_adv's).
  student_net.register_forward_pre_hook(lambda module, _: modes.append(module.training))
  log = io.StringIO()
  with nayer_side.cuda_calls_on_cpu(), tempfile.TemporaryDirectory() as pool_dir:
    with contextlib.redirect_stdout(log):
      synthesizer = datafree.synthesis.NAYER(
          teacher, student_net, generator, num_classes=k,
          img_size=(3, spec.image_size, spec.image_size), save_dir=pool_dir,
          device=torch.device("cpu"), transform=None, normalizer=normalizer,
          synthesis_batch_size=batch, sample_batch_size=batch, g_steps=g.steps, warmup=warmup,
          lr_g=g.lr, adv=config.loss.adv, bn=config.loss.bn, oh=config.loss.ce,
          bn_mmt=config.loss.bn_momentum, g_life=g_life, g_loops=g_loops, gwp_loops=1)
    # A round ends where NAYER banks its best batch: the student's statistics and modes then.
    ends: list[tuple[dict[str, np.ndarray], list[bool]]] = []
    add = synthesizer.data_pool.add

    def add_and_record(images):
      ends.append((_torch_bn_stats(student_net), modes[:]))
      modes.clear()
      return add(images)

    synthesizer.data_pool.add = add_and_record
    for this_call in schedule.calls():
      log.seek(0)
      log.truncate()
      ends.clear()
      start = _torch_bn_stats(student_net)
      with contextlib.redirect_stdout(log):
        out, *_ = synthesizer.synthesize()
      # datafree_kd's loop then calls student.train() for its KD steps (none here, so that call
      # changes nothing) and student.eval() before evaluating; synthesize() starts with eval() too.
      student_net.eval()
      steps_logged = [m.groups() for m in map(_STEP_LINE.match, log.getvalue().splitlines()) if m]
      expected = g.steps * len(this_call)
      if len(steps_logged) != expected or len(out["synthetic"]) != len(this_call):
        raise RuntimeError(f"expected {expected} step lines and {len(this_call)} batches from "
                           f"NAYER's synthesize(), got {len(steps_logged)} and "
                           f"{len(out['synthetic'])}: its print format or schedule changed?\n"
                           f"{log.getvalue()[:500]}")
      for i, (_, _, warmup_round) in enumerate(this_call):
        best = out["synthetic"][i].detach().numpy().transpose(0, 2, 3, 1)
        # NAYER's generate_ys: with a batch a multiple of K, the labels 0..K-1 repeated.
        labels = np.tile(np.arange(k), batch // k)
        logged = steps_logged[i * g.steps:(i + 1) * g.steps]
        first, last = logged[0], logged[-1]
        after, round_modes = ends[i]
        unweighted = lambda line: float(line[4]) / config.loss.adv
        yield best, labels, {
            "step_ce": [float(first[3]), float(last[3])],
            "step_bn": [float(first[2]), float(last[2])],
            "step_adv": (None if warmup_round or not config.loss.adv
                         else [unweighted(first), unweighted(last)]),
            "bn_drift": bn_drift(ends[i - 1][0] if i else start, after),
            "student_train_share": (float(np.mean(round_modes)) if round_modes else None)}


def side_rounds(side: str, config, bundle, table, seed: int, schedule: Schedule,
                nayer_path: str | None = None, student: dict[str, Any] | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
  """One side's rounds for `seed` (see SIDES)."""
  if side == "nayer":
    return nayer_rounds(nayer_path, config, bundle, table, seed, schedule, student)
  return jax_rounds(config, bundle, table, seed, schedule, student, JAX_SIDES[side])


def _cell(values: list[float | None], fmt: str) -> str:
  """mean ± sample std over seeds; "—" where a side has no such figure."""
  values = [v for v in values if v is not None]
  if not values:
    return "—"
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{fmt.format(statistics.mean(values))} ± {fmt.format(spread)}"


def summary_table(results: dict[str, Any], rounds: int) -> str:
  """Markdown: per round, mean +- sample std over seeds of each judged figure, side by side."""
  sides = list(results)
  header = ["round"] + [f"{side} {name}" for name in ("top-1", "CE", "conf. wrong", "BN")
                        for side in sides]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in range(rounds):
    cells = [results[sides[0]][0]["rounds"][r].get("label", str(r + 1))]
    for key, fmt in (("top1", "{:.2f}"), ("ce", "{:.2f}"), ("confident_wrong", "{:.2f}"),
                     ("bn", "{:.1f}")):
      cells += [_cell([run["rounds"][r][key] for run in results[side]], fmt) for side in sides]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


_POST_FIGURES = (   # (name, figure of one round, format)
    ("top-1 (judge)", lambda r: r["top1"], "{:.2f}"),
    ("CE (judge)", lambda r: r["ce"], "{:.2f}"),
    ("conf. wrong (judge)", lambda r: r["confident_wrong"], "{:.2f}"),
    ("BN (judge)", lambda r: r["bn"], "{:.1f}"),
    ("L_adv, first step", lambda r: r["step_adv"] and r["step_adv"][0], "{:.4f}"),
    ("L_adv, last step", lambda r: r["step_adv"] and r["step_adv"][1], "{:.4f}"),
    ("student BN drift", lambda r: r["bn_drift"], "{:.4g}"),
    ("student forwards in train mode (observed)", lambda r: r["student_train_share"], "{:.2f}"))


def post_warmup_tables(results: dict[str, Any]) -> str:
  """Markdown: one table per post-warm-up round, every figure (rows) for every side (columns),
  mean ± sample std over seeds."""
  sides = list(results)
  rounds = results[sides[0]][0]["rounds"]
  blocks = []
  for r, info in enumerate(rounds):
    if info["warmup"]:
      continue
    rows = [f"#### {info['label']}", "", "| figure | " + " | ".join(sides) + " |",
            "|---|" + "---|" * len(sides)]
    for name, figure, fmt in _POST_FIGURES:
      rows.append(f"| {name} | " + " | ".join(
          _cell([figure(run["rounds"][r]) for run in results[side]], fmt) for side in sides) + " |")
    blocks.append("\n".join(rows))
  return "\n\n".join(blocks)


def compare(config, bundle, table, sides: list[str], seeds: list[int], schedule: Schedule,
            out_dir: str, nayer_path: str | None = None, command: str = "") -> dict[str, Any]:
  """Every side's rounds for every seed, judged; parity.json (rewritten after each run),
  parity.md and, beyond the warm-up, parity_post_warmup.md in `out_dir`. Returns the results."""
  from caedfkd_jax.engine import metrics_writer
  spec = bundle.spec
  teacher = torch_teacher(bundle)
  class_names = list(spec.class_names or table.classes)
  os.makedirs(out_dir, exist_ok=True)
  rounds = schedule.rounds()
  results: dict[str, list] = {}
  for side in sides:
    results[side] = []
    for seed in seeds:
      start = time.perf_counter()
      student = (fresh_student(config, spec.num_classes, spec.image_size, seed)
                 if schedule.post_warmup else None)
      run = {"seed": seed, "rounds": []}
      gen = side_rounds(side, config, bundle, table, seed, schedule, nayer_path, student)
      for r, (best, labels, own) in enumerate(gen):
        epoch, unit, warmup = rounds[r]
        verdict = judge(teacher, best, labels, spec.mean, spec.std, config.low_confidence)
        predicted, confidence = verdict.pop("predicted"), verdict.pop("confidence_B")
        label = schedule.label(epoch, unit, warmup)
        run["rounds"].append({"label": label, "epoch": epoch, "unit": unit, "warmup": warmup,
                              **verdict, **own})
        adv = own["step_adv"]
        print(f"{side} seed {seed} round {label}: top-1 {verdict['top1']:.2f} CE "
              f"{verdict['ce']:.2f} confident-wrong {verdict['confident_wrong']:.2f} BN "
              f"{verdict['bn']:.1f} (own steps: CE {own['step_ce'][0]:.2f}->{own['step_ce'][1]:.2f}, "
              f"BN {own['step_bn'][0]:.1f}->{own['step_bn'][1]:.1f}"
              + (f", L_adv {adv[0]:.4f}->{adv[1]:.4f}" if adv else "")
              + f") student BN drift {own['bn_drift']:.4g}"
              + (f", train-mode forwards {own['student_train_share']:.2f}"
                 if own["student_train_share"] is not None else ""), flush=True)
        if seed == seeds[0] and r == len(rounds) - 1:
          metrics_writer.save_image_grid(
              os.path.join(out_dir, f"{side}_last_round.png"), best, labels,
              spec.num_classes, per_class=8, class_names=class_names, predicted_B=predicted,
              confidence_B=confidence)
      run["seconds"] = time.perf_counter() - start
      results[side].append(run)
      out = {"command": command, "rounds": len(rounds), "schedule": dataclasses.asdict(schedule),
             "config": json.loads(config.to_json()), "results": results}
      with open(os.path.join(out_dir, "parity.json"), "w") as f:
        json.dump(out, f, indent=1)
  table_md = summary_table(results, len(rounds))
  with open(os.path.join(out_dir, "parity.md"), "w") as f:
    f.write(table_md + "\n")
  print(table_md)
  if schedule.post_warmup:
    post_md = post_warmup_tables(results)
    with open(os.path.join(out_dir, "parity_post_warmup.md"), "w") as f:
      f.write(post_md + "\n")
    out["post_warmup_md"] = post_md   # The last run's record, with the tables beside it.
    with open(os.path.join(out_dir, "parity.json"), "w") as f:
      json.dump(out, f, indent=1)
    print("\n" + post_md)
  return results


def _define_flags() -> dict[str, Any]:
  """The command's flags, defined only when it runs (importing this module defines none)."""
  from absl import flags
  from ml_collections import config_flags
  f = {
      "config": config_flags.DEFINE_config_file("config", None,
                                                "Config file, as for `caedfkd distill`."),
      "nayer_path": flags.DEFINE_string("nayer_path", None,
                                        "A checkout of github.com/tmtuan1307/NAYER."),
      "warmup_rounds": flags.DEFINE_integer(
          "warmup_rounds", 8, "Warm-up rounds per side and seed (with --epochs, one per "
          "warm-up epoch, as NAYER's gwp_loops=1)."),
      "epochs": flags.DEFINE_integer(
          "epochs", 0, "Post-warm-up epochs after the warm-up (0: warm-up rounds only)."),
      "rounds_per_epoch": flags.DEFINE_integer(
          "rounds_per_epoch", None, "Rounds per post-warm-up epoch (NAYER's g_loops; default: "
          "the config's g_loops)."),
      "g_loops": flags.DEFINE_integer("g_loops", None, "NAYER's name of --rounds_per_epoch."),
      "seeds": flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run per side each."),
      "sides": flags.DEFINE_list("sides", ["jax", "nayer"], f"Any of {', '.join(SIDES)}: ours with "
                                 "the config's student_train_mode_in_rounds, forced False, "
                                 "forced True; NAYER's code."),
      "out_dir": flags.DEFINE_string("out_dir", "runs/nayer_parity",
                                     "Where the JSON, tables and grids go."),
  }
  flags.DEFINE_alias("rounds", "warmup_rounds")
  flags.mark_flag_as_required("config")
  return f


def main(argv, f: dict[str, Any]) -> None:
  del argv
  from absl import app
  from caedfkd_jax.io import bundle as bundle_lib
  from caedfkd_jax.io import embeddings
  config = f["config"].value
  if not config.teacher:
    raise app.UsageError("--config.teacher: a teacher bundle is needed (the parity is about a "
                         "real teacher; `caedfkd convert` makes one).")
  sides = f["sides"].value
  if unknown := [s for s in sides if s not in SIDES]:
    raise app.UsageError(f"--sides {','.join(unknown)}: use any of {', '.join(SIDES)}.")
  if "nayer" in sides and not f["nayer_path"].value:
    raise app.UsageError("--sides nayer needs --nayer_path=PATH of a NAYER checkout.")
  per_epoch, g_loops = f["rounds_per_epoch"].value, f["g_loops"].value
  if per_epoch is not None and g_loops is not None and per_epoch != g_loops:
    raise app.UsageError(f"--rounds_per_epoch {per_epoch} and --g_loops {g_loops}: one flag "
                         "(NAYER's g_loops is its rounds per epoch); give one value.")
  per_epoch = per_epoch if per_epoch is not None else g_loops
  schedule = Schedule(f["warmup_rounds"].value, f["epochs"].value,
                      per_epoch if per_epoch is not None else config.g_loops)
  if schedule.post_warmup and not config.loss.adv:
    print("note: loss.adv is 0, so the student never enters a round; NAYER's CIFAR value is "
          "--config.loss.adv=1.33.", file=sys.stderr)
  if config.cend.mode != "clean":
    print(f"note: cend.mode={config.cend.mode!r}; NAYER's side always uses the clean table, so "
          "only --config.cend.mode=clean compares like with like.", file=sys.stderr)
  compare(config, bundle_lib.load_bundle(config.teacher), embeddings.load_table(config.embeddings),
          sides, [int(s) for s in f["seeds"].value], schedule, f["out_dir"].value,
          f["nayer_path"].value, " ".join(sys.argv))


if __name__ == "__main__":
  from absl import app
  _flags = _define_flags()
  app.run(functools.partial(main, f=_flags))

"""Many runs of one config in one program: seeds and a sweep over a leading run axis.

`--config.num_runs=R` trains R runs that differ only in seed (config.seed, +1,
..., +R-1); `--config.sweep="student.cncl_weight=0,0.5"` repeats them at every
point of a grid of float hyper-parameters (the method's `sweepable`), whose values are
carried in each run's state and traced, not compiled in. Every per-run piece of
the state gets a leading run axis; the teacher is shared. Run i of point p is
exactly the lone run of `run_config(config, run)`.

On accelerators the step functions are `jax.vmap`-ed over the run axis. XLA:CPU
turns a vmapped convolution with per-run weights into a grouped convolution that
ran 3.3-3.5x slower per run than separate ones (measured, docs/results.md), so on
CPUs the runs are traced one after another inside the same compiled program
instead (`over_runs`). Either way: one compile per phase, one stacked state.
"""

import dataclasses
import itertools
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from caedfkd_jax.config import fields
from caedfkd_jax.methods import registry


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a multi-run job: its place on the run axis, its seed, its sweep point."""
  index: int
  seed: int
  point: int                      # index of its sweep point
  values: tuple[tuple[str, float], ...]  # the swept fields and this run's values

  @property
  def name(self) -> str:
    return f"run_{self.index:02d}"

  @property
  def label(self) -> str:
    """The sweep point, as `field=value, ...` ("" when nothing is swept)."""
    return ", ".join(f"{k}={v:g}" for k, v in self.values)


def is_multi(config: ml_collections.ConfigDict) -> bool:
  """Whether the config asks for a run axis (more than one run, or any swept field)."""
  return config.num_runs > 1 or bool(config.sweep.strip())


def plan_runs(config: ml_collections.ConfigDict,
              sweep: dict[str, tuple[float, ...]] | None = None) -> list[Run]:
  """Every run: sweep points in grid order, and within a point the seeds seed..seed+R-1
  (the same seeds at every point, so points are compared on paired seeds). `sweep`: the
  parsed `config.sweep` (None: parsed here, against the method's sweepable fields)."""
  if config.num_runs < 1:
    raise ValueError(f"config.num_runs={config.num_runs} must be at least 1.")
  if sweep is None:
    sweep = fields.parse_sweep(config.sweep, registry.get(config.method).sweepable)
  points = [tuple(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]
  return [Run(index=p * config.num_runs + r, seed=config.seed + r, point=p, values=values)
          for p, values in enumerate(points) for r in range(config.num_runs)]


def run_config(config: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The config of `run` alone: its seed and swept values set, no run axis."""
  lone = ml_collections.ConfigDict(config.to_dict())
  lone.seed = run.seed
  lone.num_runs = 1
  lone.sweep = ""
  for name, value in run.values:
    fields.set_field(lone, name, type(fields.get_field(lone, name))(value))
  return lone


def hparams(run: Run) -> dict[str, jax.Array]:
  """The run's swept values as the state's traced hyper-parameters."""
  return {name: jnp.float32(value) for name, value in run.values}


def stack(trees: Sequence[Any]) -> Any:
  """Per-run pytrees -> one pytree with a leading run axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, index: int) -> Any:
  """Run `index` of a stacked pytree."""
  return jax.tree.map(lambda x: x[index], tree)


def over_runs(fn: Callable, in_axes: Sequence[int | None], num_runs: int,
              vectorize: bool) -> Callable:
  """`fn` over a leading run axis of the arguments marked 0 in `in_axes` (None: shared).

  Every output gets the run axis. `vectorize`: `jax.vmap`; otherwise the runs are traced one
  after another into the same program (the CPU choice, see the module docstring). Keyword
  arguments are passed to every run unchanged.
  """
  if vectorize:
    def vectorized(*args, **kwargs):
      return jax.vmap(lambda *a: fn(*a, **kwargs), in_axes=tuple(in_axes))(*args)
    return vectorized

  def unrolled(*args, **kwargs):
    outs = [fn(*[a if axis is None else unstack(a, r) for a, axis in zip(args, in_axes)], **kwargs)
            for r in range(num_runs)]
    return stack(outs)
  return unrolled


def resolve_vectorize(config, platform: str | None = None) -> bool:
  """`config.runs_vectorized`, else vmap on accelerators and runs one after another on CPUs."""
  if config.runs_vectorized is not None:
    return bool(config.runs_vectorized)
  return (platform or jax.default_backend()) != "cpu"


# --------------------------------------------------------------------------- #
# The summary of a multi-run job
# --------------------------------------------------------------------------- #


def interval95(values: Sequence[float | None]) -> dict[str, float | None]:
  """n, mean, sample standard deviation and the two-sided 95% Student-t interval of the mean.

  Missing values (None) are left out; what n cannot define is None (valid JSON, unlike NaN).
  """
  from scipy import stats  # scikit-learn's dependency; only needed here.
  x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
  n = len(x)
  mean = float(x.mean()) if n else None
  if n < 2:
    return {"n": n, "mean": mean, "std": None, "ci95_low": None, "ci95_high": None}
  std = float(x.std(ddof=1))
  half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n))
  return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def first_reaching(rows: Sequence[dict[str, Any]], level: float) -> dict[str, float] | None:
  """The first logged epoch whose eval/top1 is at least `level`: {"epoch", "minutes"}, or None."""
  for row in rows:
    if row.get("eval/top1", -np.inf) >= level:
      return {"epoch": row["epoch"], "minutes": row["time/minutes"]}
  return None


def summarize(runs: Sequence[Run], rows_per_run: Sequence[Sequence[dict[str, Any]]],
              levels: Sequence[float]) -> list[dict[str, Any]]:
  """Per sweep point: final top-1 and time to each top-1 level, over its runs.

  `rows_per_run[i]` are run i's metrics rows (epoch order). A run's final top-1 is its last
  evaluated epoch's. Time to a level is over the runs that reached it; `reached` says how many.
  """
  points = []
  for p in sorted({run.point for run in runs}):
    members = [i for i, run in enumerate(runs) if run.point == p]
    finals, per_run = [], []
    for i in members:
      evaluated = [row for row in rows_per_run[i] if "eval/top1" in row]
      final = evaluated[-1]["eval/top1"] if evaluated else None
      finals.append(final)
      per_run.append({"run": runs[i].name, "seed": runs[i].seed, "final_top1": final,
                      "epochs": rows_per_run[i][-1]["epoch"] if rows_per_run[i] else 0})
    to_level = []
    for level in levels:
      hits = [first_reaching(rows_per_run[i], level) for i in members]
      got = [h for h in hits if h is not None]
      to_level.append({"top1": level, "reached": len(got), "of": len(members),
                       "minutes": interval95([h["minutes"] for h in got]),
                       "epochs": interval95([h["epoch"] for h in got])})
    points.append({"point": runs[members[0]].label or "(no sweep)",
                   "values": dict(runs[members[0]].values),
                   "final_top1": interval95(finals), "time_to_top1": to_level, "runs": per_run})
  return points


def format_summary(points: Sequence[dict[str, Any]]) -> str:
  """The summary as a Markdown table (one row per sweep point), then time to each level."""
  fmt = lambda s: ("n/a" if s["mean"] is None else f"{s['mean']:.2f}" if s["n"] < 2 else
                   f"{s['mean']:.2f} ± {s['std']:.2f} [{s['ci95_low']:.2f}, {s['ci95_high']:.2f}]")
  lines = ["| sweep point | runs | final top-1 %: mean ± std [95% CI] |", "|---|---|---|"]
  for p in points:
    lines.append(f"| {p['point']} | {p['final_top1']['n']} | {fmt(p['final_top1'])} |")
  if any(p["time_to_top1"] for p in points):
    lines += ["", "| sweep point | top-1 level | reached | minutes: mean ± std [95% CI] | epochs |",
              "|---|---|---|---|---|"]
    for p in points:
      for t in p["time_to_top1"]:
        lines.append(f"| {p['point']} | {t['top1']:.2f}% | {t['reached']}/{t['of']} | "
                     f"{fmt(t['minutes'])} | {fmt(t['epochs'])} |")
  return "\n".join(lines)


def read_rows(run_dir: str) -> list[dict[str, Any]]:
  """A run's metrics rows (metrics.jsonl, which a resume keeps to one row per epoch)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_epoch(epoch: int, epochs: int, runs: Sequence[Run],
                 summaries: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
  """One line per epoch for all runs: each sweep point's mean (± std over seeds) of `keys`."""
  parts = []
  for p in sorted({run.point for run in runs}):
    members = [summaries[i] for i, run in enumerate(runs) if run.point == p]
    stats = []
    for k in keys:
      values = [m[k] for m in members if k in m]
      if values:
        spread = f"±{np.std(values, ddof=1):.3g}" if len(values) > 1 else ""
        stats.append(f"{k.split('/')[1]}={np.mean(values):.4g}{spread}")
    label = [run.label for run in runs if run.point == p][0]
    parts.append((f"[{label}] " if label else "") + " ".join(stats))
  minutes = summaries[0].get("time/minutes", float("nan"))
  return (f"epoch {epoch}/{epochs} ({len(runs)} runs): " + "; ".join(parts)
          + f" time={minutes:.3g} min")

r"""What the generator's noisy layer does to CEND's structure: per_view against per_group.

  python -m benchmarks.cend_structure --embeddings cifar10 --seeds 0,1,2,3,4

For a fresh NAYER generator (as every run starts and every g_life renews it) fed one CEND
batch of the given table, per noisy-layer mode:
- the cosine between an anchor (a class's clean embedding) and each of its own diffused views,
  and between an anchor and other classes' anchors, at three points: the CEND embeddings, after
  the generator's BatchNorm1d, and after its noisy layer (the first layer that differs by mode);
- the same two similarities between the generated images (flattened, centred per image).
Mean over classes, views, groups and seeds. No training: a structural measurement, not a result
about accuracy.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from caedfkd_jax.io import embeddings
from caedfkd_jax.synthesis import cend, generator as generator_lib


def _cosines(rows_GxVxKxD: np.ndarray) -> tuple[float, float]:
  """(anchor vs its own views, anchor vs other classes' anchors), mean cosine."""
  x = rows_GxVxKxD / np.linalg.norm(rows_GxVxKxD, axis=-1, keepdims=True)
  anchors, views = x[:, 0], x[:, 1:]
  own = np.einsum("gkd,gvkd->gvk", anchors, views).mean()
  cross = np.einsum("gkd,gld->gkl", anchors, anchors)
  k = cross.shape[-1]
  other = cross[:, ~np.eye(k, dtype=bool)].mean()
  return float(own), float(other)


def measure(table: np.ndarray, mode: str, seed: int, num_groups: int = 2, num_sources: int = 4,
            magnitude: float = 0.1) -> dict[str, tuple[float, float]]:
  k, d = table.shape
  views = num_sources + 1
  gen = generator_lib.Generator(
      num_classes=k, img_size=32, noise_dim=1000, ngf=64,
      noisy_chunk_rows=generator_lib.noisy_chunk_rows(mode, k, views))
  rng_params, rng_noisy, rng_batch = jax.random.split(jax.random.key(seed), 3)
  batch = cend.build_generator_batch(rng_batch, jnp.asarray(table), num_groups, num_sources,
                                     magnitude)
  params = generator_lib.init_generator(rng_params, gen, batch.embeddings_BxD.shape[0], d)
  params = generator_lib.reinit_noisy_layer(params, rng_noisy)   # As every round begins.
  images, state = gen.apply({"params": params}, batch.embeddings_BxD,
                            capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  normed = np.asarray(inter["embed_norm"]["__call__"][0])
  noisy = np.asarray(inter[generator_lib.NOISY_LAYER]["__call__"][0])
  flat = np.asarray(images).reshape(images.shape[0], -1)
  flat = flat - flat.mean(axis=1, keepdims=True)
  shape = lambda a: a.reshape(num_groups, views, k, -1)
  return {"embeddings": _cosines(shape(np.asarray(batch.embeddings_BxD))),
          "after_bn1d": _cosines(shape(normed)), "after_noisy_layer": _cosines(shape(noisy)),
          "images": _cosines(shape(flat))}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--embeddings", default="cifar10")
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--magnitude", type=float, default=0.1)
  parser.add_argument("--out_json", default=None)
  args = parser.parse_args(argv)
  table = embeddings.load_table(args.embeddings).vectors
  seeds = [int(s) for s in args.seeds.split(",")]
  result = {}
  print(f"table {args.embeddings} ({table.shape[0]} x {table.shape[1]}), M = {args.magnitude}, "
        f"seeds {seeds}; cosine: anchor vs its own views | anchor vs other anchors")
  for mode in generator_lib.NOISY_CHUNKS:
    runs = [measure(table, mode, s, magnitude=args.magnitude) for s in seeds]
    result[mode] = {point: [float(np.mean([r[point][i] for r in runs])) for i in (0, 1)]
                    for point in runs[0]}
    for point, (own, other) in result[mode].items():
      print(f"  {mode:9s} {point:18s} {own:7.3f} | {other:7.3f}")
  if args.out_json:
    with open(args.out_json, "w") as f:
      json.dump({"args": vars(args), "result": result}, f, indent=1)


if __name__ == "__main__":
  main()

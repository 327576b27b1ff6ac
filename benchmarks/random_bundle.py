r"""A randomly initialised model bundle: the floor a probe of learnt features is read against.

  python -m benchmarks.random_bundle resnet20 10 /tmp/probe/random_resnet20 --seed 0

The same arguments give the same weights (Flax init from `jax.random.key(seed)`). Inputs are
normalised like the akamaster teachers (ImageNet mean/std, 32x32) unless told otherwise, so
the floor sees the same pixels as the converted teachers and the students distilled from them.
"""

import argparse

from caedfkd_jax.io import bundle as bundle_lib


def make_random_bundle(arch: str, num_classes: int, out: str, seed: int = 0,
                       image_size: int = 32, mean: tuple[float, ...] = bundle_lib.IMAGENET_MEAN,
                       std: tuple[float, ...] = bundle_lib.IMAGENET_STD) -> str:
  """Writes the bundle and returns its path; the seed is kept in model.json's `extra`."""
  spec = bundle_lib.ModelSpec(arch, num_classes, image_size, tuple(mean), tuple(std),
                              extra={"random_init_seed": seed})
  return bundle_lib.save_bundle(out, spec, bundle_lib.init_variables(spec, seed))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("arch")
  parser.add_argument("num_classes", type=int)
  parser.add_argument("out", help="bundle directory to write (replaced if it is a bundle)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image-size", type=int, default=32)
  args = parser.parse_args(argv)
  path = make_random_bundle(args.arch, args.num_classes, args.out, args.seed, args.image_size)
  print(f"random {args.arch} ({args.num_classes} classes, seed {args.seed}) written to {path}")


if __name__ == "__main__":
  main()

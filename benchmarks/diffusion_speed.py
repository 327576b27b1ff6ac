r"""DiffDFKD's synthesis speed: images/s of a synthesis round with full-size Stable Diffusion v1.x.

  python -m benchmarks.diffusion_speed --out_json diffusion_speed.json          # a GPU
  python -m benchmarks.diffusion_speed --dry                                     # CI size

A round is the method's own compiled unit (methods/diffdfkd.py): `steps` guided denoising
steps, each a UNet call under a gradient through the UNet, x0_hat and the VAE, a second
UNet call and the DDPM step, then the final decode and the bank write. The networks are
randomly initialised with SD v1.x's shapes (the UNet's 860M parameters, the VAE decoder's
49M; speed does not depend on the weights) and the prompts' embeddings are random
(77 x 768); the teacher is a random ResNet-34 (CIFAR, 32x32), the student a ResNet-18.
`--dry` runs the same code with the tests' tiny networks on CPU.

Memory: the peak the device reports after the timed rounds (GPU), and from it a linear
estimate of the largest `diffdfkd.batch` that fits in 90% of the device's memory.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from caedfkd_jax.config import defaults
from caedfkd_jax.diffusion import scheduler, unet as unet_lib, vae as vae_lib
from caedfkd_jax.engine import steps, train
from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.methods import diffdfkd
from caedfkd_jax.runtime import platform
from caedfkd_jax.runtime.mesh import make_mesh

TINY_UNET = unet_lib.UNetConfig(block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                num_attention_heads=(4, 4), cross_attention_dim=32,
                                norm_num_groups=8)
TINY_VAE = vae_lib.VAEDecoderConfig(block_out_channels=(16, 32), layers_per_block=1,
                                    norm_num_groups=8)


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(batch: int, num_steps: int, latent_size: int, repeats: int, dry: bool,
            compute_dtype: str = "auto", teacher_arch: str = "resnet34",
            student_arch: str = "resnet18", num_classes: int = 10, attention: str = "xla") -> dict:
  config = defaults.get_config("diffdfkd")
  config.compute_dtype = compute_dtype
  config.student_arch = student_arch
  config.student.sampler = "uniform"
  config.num_devices = 1
  config.diffdfkd.update({"steps": num_steps, "batch": batch, "latent_size": latent_size,
                          "attention": attention})
  spec = bundle_lib.ModelSpec(teacher_arch, num_classes, 32,
                              class_names=[f"class {k}" for k in range(num_classes)])
  teacher = bundle_lib.Bundle(spec, bundle_lib.init_variables(spec, 0))
  unet_config, vae_config = (TINY_UNET, TINY_VAE) if dry else (unet_lib.UNetConfig(),
                                                                 vae_lib.VAEDecoderConfig())
  setup = diffdfkd.make_setup(train.shared_setup(config, teacher), unet_config, vae_config,
                              scheduler.SD_V1)
  synth = setup.generator
  mesh = make_mesh(jax.devices()[:1])
  replicated = NamedSharding(mesh, P())
  rng = jax.random.key(0)
  z = jnp.zeros((1, latent_size, latent_size, vae_config.latent_channels))
  text_len, width = (16, unet_config.cross_attention_dim) if dry else (77, 768)
  text = jnp.zeros((1, text_len, width))
  init = lambda module, *args: jax.jit(module.init)(rng, *args)["params"]
  frozen = {"teacher": {k: teacher.variables[k] for k in ("params", "batch_stats")},
            "unet": init(synth.unet, jnp.concatenate([z, z]), 1, jnp.concatenate([text, text])),
            "vae": init(synth.vae, z),
            "uncond": jax.random.normal(rng, (text_len, width)),
            "text": jax.random.normal(rng, (num_classes, text_len, width))}
  frozen = jax.device_put(frozen, replicated)
  state = jax.device_put(train.create_state(setup, frozen["teacher"]), replicated)
  fns = steps.make_step_fns(setup, mesh)
  fused = steps.resolve_fuse(config, platform=mesh.devices.flat[0].platform)
  start = time.perf_counter()
  state, _, _ = fns["round"](state, frozen)
  jax.block_until_ready(state)
  first_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics, _ = fns["round"](state, frozen)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  round_s = float(np.median(times))
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  weights = tree_bytes(frozen["unet"]) + tree_bytes(frozen["vae"])
  result = {
      "device": device.device_kind, "platform": device.platform, "dry": dry,
      "compute_dtype": str(jnp.dtype(platform.compute_dtype(compute_dtype))), "attention": attention,
      "unet_params": int(sum(x.size for x in jax.tree.leaves(frozen["unet"]))),
      "vae_decoder_params": int(sum(x.size for x in jax.tree.leaves(frozen["vae"]))),
      "batch": batch, "denoising_steps": num_steps, "latent_size": latent_size,
      "fused_round": fused, "first_round_s": first_s, "round_s": round_s,
      "round_s_all": times, "images_per_s": batch / round_s,
      "unet_rows_per_s": 2 * 2 * batch * num_steps / round_s,   # 2 calls a step of 2B rows (CFG).
      "gen_loss_finite": bool(np.all(np.isfinite(np.asarray(metrics["gen/loss"])))),
  }
  if "peak_bytes_in_use" in stats and "bytes_limit" in stats:
    per_image = max(stats["peak_bytes_in_use"] - weights, 1) / batch
    result.update(peak_bytes=int(stats["peak_bytes_in_use"]), bytes_limit=int(stats["bytes_limit"]),
                  max_batch_estimate=int((0.9 * stats["bytes_limit"] - weights) // per_image))
  return result


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dry", action="store_true", help="tiny networks, CPU size")
  parser.add_argument("--batch", type=int, default=None, help="latents a round (default 8; dry 2)")
  parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 10; dry 2)")
  parser.add_argument("--latent_size", type=int, default=None, help="default 64; dry 8")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--compute_dtype", default="auto")
  parser.add_argument("--teacher_arch", default=None, help="default resnet34; dry resnet_tiny_a")
  parser.add_argument("--student_arch", default=None, help="default resnet18; dry resnet_tiny_a")
  parser.add_argument("--attention", default="xla", choices=("xla", "cudnn"),
                      help="the UNet's attention (cudnn: fused flash attention, GPU, bf16)")
  parser.add_argument("--out_json", default=None)
  args = parser.parse_args(argv)
  dry = args.dry
  result = measure(args.batch or (2 if dry else 8), args.steps or (2 if dry else 10),
                   args.latent_size or (8 if dry else 64), args.repeats, dry, args.compute_dtype,
                   args.teacher_arch or ("resnet_tiny_a" if dry else "resnet34"),
                   args.student_arch or ("resnet_tiny_a" if dry else "resnet18"),
                   attention=args.attention)
  text = json.dumps(result, indent=1)
  print(text)
  if args.out_json:
    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()

r"""DiffDFKD (Qi et al., ICME 2025, arXiv 2504.00870) on CIFAR (METHOD.md b.6).

Synthesis as the authors' CIFAR script (github.com/xhqi0109/DiffDFKD,
script/generate_data): Stable Diffusion v1.5, 10 denoising steps, guidance 3,
prompts with the class names ("a realistic photo of {class}"), 512-px images (64x64
latents) resized to 32; L_inv weights the code's option defaults, oh 1, bn 0.1, adv 1
(its CIFAR script's "baseline_label" run sets bn 0 and adv 0), L_adv after 10 images per
class; latent CutMix every 2 steps (the paper; the code's default is none). 5000
images per class, 50,000 in all. KD as its distill script: T 30, SGD lr 0.2 (momentum
0.9, weight decay 5e-4), batch 256.

No Stable Diffusion weights exist on our machines, so this config has not run here.
With a local diffusers-format copy of SD v1.5 (safetensors):

  caedfkd convert-diffusion PATH/stable-diffusion-v1-5 --out bundles/sd15
  caedfkd convert cifar10_resnet34.pth --arch resnet34 --num-classes 10 --preset dfkd \
      --out teachers/cifar10_resnet34
  caedfkd distill --config configs/diffdfkd_cifar.py:cifar10,resnet34,resnet18 \
      --workdir runs/diffdfkd_c10_r34_r18 --config.teacher=teachers/cifar10_resnet34 \
      --config.diffdfkd.weights=bundles/sd15 --config.eval_data=PATH/cifar10

Schedule (ours, one run): one warm-up epoch of 10 rounds (one class each, no L_adv),
then 499 epochs of 10 rounds and 80 KD steps: 5,000 rounds of 10 images (50,000 images)
and 39,920 KD steps, about 204 passes over the final 50k images at batch 256. The code instead
generates all images first (distilling every 10 images per class) and then distills
for 240 epochs with a step decay at 150/180/210; ours decays by a cosine while the bank
fills. Each round is 10 steps of two UNet calls (one under a gradient) on 10 latents,
plus VAE decodes: GPU-hours (docs/results.md has the measured images/s).
"""

from caedfkd_jax.config import defaults

PAIRS = {("cifar10", "resnet34", "resnet18"), ("cifar10", "wrn40_2", "wrn16_2"),
         ("cifar10", "vgg11", "resnet18"), ("cifar100", "resnet34", "resnet18"),
         ("cifar100", "wrn40_2", "wrn16_2")}


def get_config(arg: str = "cifar10,resnet34,resnet18"):
  dataset, teacher, student = arg.split(",")
  if (dataset, teacher, student) not in PAIRS:
    raise ValueError(f"diffdfkd_cifar.py:{arg}: known pairs are "
                     f"{', '.join(','.join(p) for p in sorted(PAIRS))}.")
  config = defaults.get_config("diffdfkd")
  config.teacher_arch_expected = teacher
  config.student_arch = student
  config.compute_dtype = "auto"           # bfloat16 on GPUs.
  c = config.diffdfkd
  c.steps, c.guidance_scale, c.latent_size = 10, 3.0, 64
  c.prompt = "a realistic photo of {class}"
  c.batch, c.one_class_per_round = 10, True
  c.latent_mix = "cutmix"
  c.kd_batch = 256
  config.loss.ce, config.loss.bn, config.loss.adv = 1.0, 0.1, 1.0
  num_classes = 100 if dataset == "cifar100" else 10
  config.warmup_epochs, config.warmup_g_loops = 1, num_classes   # 10 images a class, no L_adv.
  config.g_loops = 10
  config.epochs = 1 + (50_000 // 10 - num_classes) // config.g_loops
  config.student.sampler = "uniform"
  config.student.temperature = 30.0
  config.student.lr, config.student.momentum, config.student.weight_decay = 0.2, 0.9, 5e-4
  config.student.kd_steps, config.student.steps_per_call = 80, 10
  return config

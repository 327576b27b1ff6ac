"""Times NAYER's own code (github.com/tmtuan1307/NAYER) from a checkout the user gives.

Nothing of NAYER is copied here: its `datafree` package and `registry.py` are
imported from the checkout, and its synthesizer (`datafree.synthesis.NAYER`:
generator rounds, PNG memory pool, DataLoader) runs as NAYER runs it. The KD loop
is `datafree_kd.train`'s, restated because that module starts wandb on import:
`synthesizer.sample()`, teacher under no_grad, `datafree.criterions.KLDiv(T)`, SGD.
NAYER's generator gets the clean class table (NAYER's method: no CEND, no CNCL), and
NAYER's registry builds the networks (its resnet20/56 are RepDistiller's option-B
variants, a few percent more FLOPs than the akamaster option-A ones).

NAYER hard-codes `.cuda()`. Without CUDA, `.cuda()` is mapped to the CPU for the
duration of the measurement, and the result says so. NAYER needs torchvision and
kornia (plus the packages its `datafree` imports) in the interpreter running this.
"""

import contextlib
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np


@contextlib.contextmanager
def cuda_calls_on_cpu():
  """Maps `.cuda()` of modules and tensors to no-ops: NAYER's code on a machine without CUDA."""
  import torch
  saved = torch.nn.Module.cuda, torch.Tensor.cuda
  torch.nn.Module.cuda = lambda self, *args, **kwargs: self
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  try:
    yield
  finally:
    torch.nn.Module.cuda, torch.Tensor.cuda = saved


def import_nayer(path: str):
  """(datafree, registry) from a NAYER checkout; errors name what is missing."""
  path = os.path.abspath(os.path.expanduser(path))
  for needed in ("registry.py", os.path.join("datafree", "synthesis", "nayer.py")):
    if not os.path.exists(os.path.join(path, needed)):
      raise FileNotFoundError(f"{path} is not a NAYER checkout: {needed} is missing "
                              "(git clone github.com/tmtuan1307/NAYER).")
  sys.path.insert(0, path)
  try:
    import datafree
    import registry
  except ImportError as e:
    raise ImportError(f"NAYER's code at {path} needs a package this interpreter lacks: {e}. "
                      "Install torchvision and kornia (and what NAYER's datafree imports).") from e
  return datafree, registry


def measure(nayer_path: str, config, teacher_arch: str, table: np.ndarray, image_size: int,
            repeats: int = 3) -> dict[str, Any]:
  """NAYER's epoch (synthesize() with g_loops rounds, then kd_steps KD steps), timed."""
  import torch
  datafree, registry = import_nayer(nayer_path)
  from torchvision import transforms as T
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  k, d = table.shape
  group = k * (config.cend.num_sources + 1)
  syn_batch = config.num_groups * group
  kd_batch = config.student.batch_groups * group
  g = config.generator
  norm = registry.NORMALIZE_DICT["cifar100" if k == 100 else "cifar10"]
  torch.manual_seed(config.seed)
  log = io.StringIO()  # NAYER prints every step; kept out of the benchmark's output.
  with (contextlib.nullcontext() if cuda else cuda_calls_on_cpu()), contextlib.redirect_stdout(log), \
      tempfile.TemporaryDirectory() as pool_dir:
    teacher = registry.get_model(teacher_arch, num_classes=k).to(device).eval()
    student = registry.get_model(config.student_arch, num_classes=k).to(device)
    label_emb = torch.as_tensor(table, dtype=torch.float32, device=device)
    generator = datafree.models.generator.NLGenerator(
        ngf=g.ngf, img_size=image_size, nc=3, nl=k, label_emb=label_emb, le_emb_size=g.noise_dim,
        le_size=d, sbz=syn_batch).to(device)
    transform = T.Compose([T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize(**norm)])
    synthesizer = datafree.synthesis.NAYER(
        teacher, student, generator, num_classes=k, img_size=(3, image_size, image_size),
        save_dir=pool_dir, device=device, transform=transform,
        normalizer=datafree.utils.Normalizer(**norm), synthesis_batch_size=syn_batch,
        sample_batch_size=kd_batch, g_steps=g.steps, warmup=0, lr_g=g.lr, adv=config.loss.adv,
        bn=config.loss.bn, oh=config.loss.ce, bn_mmt=config.loss.bn_momentum,
        g_life=g.life_epochs, g_loops=config.g_loops, gwp_loops=config.warmup_g_loops)
    criterion = datafree.criterions.KLDiv(T=config.student.temperature)
    s = config.student
    optimizer = torch.optim.SGD(student.parameters(), s.lr, weight_decay=s.weight_decay,
                                momentum=s.momentum)

    def sync():
      if cuda:
        torch.cuda.synchronize()

    def kd_steps(n: int) -> None:
      student.train()
      for _ in range(n):
        images = synthesizer.sample().to(device, non_blocking=True)
        with torch.no_grad():
          t_out = teacher(images)
        loss = criterion(student(images.detach()), t_out.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
      sync()

    def epoch() -> tuple[float, float]:
      start = time.perf_counter()
      synthesizer.synthesize()
      sync()
      middle = time.perf_counter()
      kd_steps(s.kd_steps)
      return middle - start, time.perf_counter() - middle

    first = epoch()
    timed = [epoch() for _ in range(repeats)]
  synth_s = statistics.median(t[0] for t in timed)
  kd_s = statistics.median(t[1] for t in timed)
  rounds = config.g_loops
  return {
      "name": "NAYER (own code)",
      "device": (torch.cuda.get_device_name() if cuda
                 else f"cpu ({torch.get_num_threads()} threads; NAYER's .cuda() mapped to CPU)"),
      "torch": torch.__version__,
      "round_s": synth_s / rounds,
      "generator_images_per_s": syn_batch * g.steps * rounds / synth_s,
      "student_images_per_s": kd_batch * s.kd_steps / kd_s,
      "epoch_s": statistics.median(sum(t) for t in timed),
      "compile_s": max(sum(first) - statistics.median(sum(t) for t in timed), 0.0),
      "memory": {"device_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                 "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
      "notes": ("synthesize() includes NAYER's PNG writes and DataLoader rebuild; the pool "
                f"held {syn_batch * rounds * (repeats + 1)} images at the end, far fewer than "
                "the 160k of a full run, whose per-round re-listing costs more"),
      "repeats": {"epoch_s": [sum(t) for t in timed]},
  }

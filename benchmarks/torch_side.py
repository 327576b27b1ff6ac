"""An equivalent CAE-DFKD step in plain PyTorch, written for the side-by-side benchmark.

The anchor where NAYER's own code cannot run. Same networks (`caedfkd_jax.io.torch_zoo`),
same generator (NAYER's NLGenerator layout, fed CEND embeddings), same losses
(CE + BN statistics with momentum + masked adversarial KL; KL at T + CNCL), same
batch layout and optimisers, and the same algorithmic shortcuts the JAX version
takes, so the ratio measures the frameworks rather than the bookkeeping:
gradients only where they are needed, the memory bank as a uint8 tensor on the
device, the best batch kept without a host sync. bf16 runs under autocast.
"""

import math
import resource
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caedfkd_jax.io import torch_zoo


class Generator(nn.Module):
  """NAYER's NLGenerator on embeddings: BN1d, per-chunk noisy Linears, project, 2 up-conv stages."""

  def __init__(self, num_classes: int, batch: int, embed_dim: int, noise_dim: int = 1000,
               ngf: int = 64, img_size: int = 32):
    super().__init__()
    if batch % num_classes:
      raise ValueError(f"synthesis batch {batch} is not a multiple of {num_classes} classes")
    self.num_classes, self.init = num_classes, img_size // 4
    self.embed_norm = nn.BatchNorm1d(embed_dim)
    chunks = batch // num_classes
    self.noisy_weight = nn.Parameter(torch.empty(chunks, embed_dim, noise_dim))
    self.noisy_bias = nn.Parameter(torch.empty(chunks, 1, noise_dim))
    self.project = nn.Linear(noise_dim, 2 * ngf * self.init**2)
    self.body = nn.Sequential(
        nn.BatchNorm2d(2 * ngf), nn.Upsample(scale_factor=2),
        nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=False), nn.BatchNorm2d(2 * ngf),
        nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
        nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
        nn.Conv2d(ngf, 3, 3, padding=1), nn.Sigmoid())
    self.reinit_noisy_layer()

  @torch.no_grad()
  def reinit_noisy_layer(self):
    self.noisy_weight.normal_()
    self.noisy_bias.zero_()

  def forward(self, embeddings_BxD):
    b, d = embeddings_BxD.shape
    x = self.embed_norm(embeddings_BxD).view(-1, self.num_classes, d)
    x = torch.baddbmm(self.noisy_bias, x, self.noisy_weight).view(b, -1)
    x = self.project(x).view(b, -1, self.init, self.init)
    return self.body(x)


def crop_flip(images, dy, dx, flip, padding: int = 4):
  """Zero-pads, crops H x W at per-sample (dy, dx), mirrors where `flip`; NCHW, differentiable."""
  b, c, h, w = images.shape
  padded = F.pad(images, (padding,) * 4)
  cols = torch.arange(w, device=images.device)[None]
  cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)
  rows = dy[:, None] + torch.arange(h, device=images.device)[None]
  out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
  return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def random_crop_flip(images, padding: int = 4):
  """Per-sample offsets uniform in [0, 2 * padding] and flips with p = 0.5, as augment.py draws."""
  b, dev = images.shape[0], images.device
  dy = torch.randint(0, 2 * padding + 1, (b,), device=dev)
  dx = torch.randint(0, 2 * padding + 1, (b,), device=dev)
  return crop_flip(images, dy, dx, torch.rand(b, device=dev) < 0.5, padding)


def cend_batch(table_KxD, num_groups: int, num_sources: int, magnitude: float, mode: str):
  """CEND embeddings and their labels / source index in the JAX batch layout."""
  k, d = table_KxD.shape
  views = num_sources + 1
  if mode == "gaussian":
    emb = torch.randn(num_groups, views, k, d, device=table_KxD.device)
  elif mode == "clean":
    emb = table_KxD.expand(num_groups, views, k, d)
  else:
    samplers = [torch.randn, lambda *s, **kw: (torch.rand(*s, **kw) * 2 - 1) * math.sqrt(3),
                lambda *s, **kw: torch.distributions.Laplace(0.0, 1 / math.sqrt(2)).sample(s).to(kw["device"]),
                lambda *s, **kw: torch.randint(0, 2, s, device=kw["device"]).float() * 2 - 1]
    noise = torch.stack([samplers[n % 4](num_groups, k, d, device=table_KxD.device)
                         for n in range(num_sources)], 1)
    emb = torch.cat([table_KxD.expand(num_groups, 1, k, d), table_KxD + magnitude * noise], 1)
  labels = torch.arange(k, device=table_KxD.device).repeat(num_groups * views)
  source = torch.arange(views, device=table_KxD.device).repeat_interleave(k).repeat(num_groups)
  return emb.reshape(-1, d), labels, source


class BNStatistics:
  """DeepInversion's BN loss with NAYER's momentum, via forward hooks on the teacher's BatchNorms."""

  def __init__(self, model: nn.Module, momentum: float):
    self.momentum, self.stats, self.ema = momentum, [], None
    self.enabled = True  # Off during KD steps: the student loss needs no statistics.
    self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in self.layers:
      m.register_forward_hook(self._hook)

  def _hook(self, module, inputs, output):
    if not self.enabled:
      return
    x = inputs[0].float()
    self.stats.append((x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)))

  def loss(self):
    total = 0.0
    for i, (m, (mean, var)) in enumerate(zip(self.layers, self.stats)):
      if self.ema is not None:
        mean = (1 - self.momentum) * mean + self.momentum * self.ema[i][0]
        var = (1 - self.momentum) * var + self.momentum * self.ema[i][1]
      total = total + torch.norm(m.running_var - var, 2) + torch.norm(m.running_mean - mean, 2)
    return total

  def end_round(self):
    last = [(m.detach(), v.detach()) for m, v in self.stats]
    self.ema = last if self.ema is None else [
        (self.momentum * em + (1 - self.momentum) * m, self.momentum * ev + (1 - self.momentum) * v)
        for (em, ev), (m, v) in zip(self.ema, last)]


def kl_rows(teacher_logits, student_logits):
  log_t, log_s = F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1)
  return (log_t.exp() * (log_t - log_s)).sum(-1)


def cncl(features, labels, source, temperature: float):
  """Multi-positive InfoNCE over anchors (source 0); the JAX `losses.cncl_loss` "infonce" form."""
  f = F.normalize(features.float(), dim=-1, eps=1e-8)
  logits = f @ f.T / temperature
  same = labels[:, None] == labels[None, :]
  positive = same & (source[None, :] >= 1)
  neg_inf = torch.finfo(torch.float32).min
  log_pos = torch.logsumexp(logits.masked_fill(~positive, neg_inf), -1)
  log_all = torch.logsumexp(logits.masked_fill(~(positive | ~same), neg_inf), -1)
  valid = (source == 0) & positive.any(-1)
  return torch.where(valid, log_all - log_pos, 0.0).sum() / valid.sum().clamp(min=1)


class TorchDFKD:
  """The generator round and the KD steps of one CAE-DFKD epoch, in PyTorch."""

  def __init__(self, config, teacher_arch: str, table: np.ndarray, mean, std,
               image_size: int, device: str):
    self.cfg, self.device = config, torch.device(device)
    k = table.shape[0]
    self.group = k * (config.cend.num_sources + 1)
    self.syn_batch = config.num_groups * self.group
    self.kd_batch = config.student.batch_groups * self.group
    s = config.student
    from caedfkd_jax.methods.bank_kd import cncl_subbatch_groups   # The JAX side's rule.
    cncl_groups = cncl_subbatch_groups(config)
    self.kd_images = (s.batch_groups + cncl_groups) * self.group   # through the student a step
    self.teacher = torch_zoo.build(teacher_arch, k).to(self.device).eval().requires_grad_(False)
    self.student = torch_zoo.build(config.student_arch, k).to(self.device)
    self.generator = Generator(k, self.syn_batch, table.shape[1], config.generator.noise_dim,
                               config.generator.ngf, image_size).to(self.device)
    self.table = torch.as_tensor(table, dtype=torch.float32, device=self.device)
    self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
    self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
    self.bn = BNStatistics(self.teacher, config.loss.bn_momentum)
    s = config.student
    self.student_opt = torch.optim.SGD(self.student.parameters(), s.lr, momentum=s.momentum,
                                       weight_decay=s.weight_decay)
    capacity = 10 * self.syn_batch
    self.bank = torch.randint(0, 256, (capacity, 3, image_size, image_size), dtype=torch.uint8,
                              device=self.device)
    self.bank_labels = torch.zeros(capacity, dtype=torch.long, device=self.device)
    self.bank_source = torch.zeros(capacity, dtype=torch.long, device=self.device)
    self.cursor = 0
    use_bf16 = config.compute_dtype == "bfloat16" or (
        config.compute_dtype == "auto" and self.device.type != "cpu")
    self.autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=use_bf16)

  def _normalize(self, x):
    return (x - self.mean) / self.std

  def generator_round(self):
    cfg = self.cfg
    self.generator.reinit_noisy_layer()
    self.bn.enabled = True
    opt = torch.optim.Adam(self.generator.parameters(), cfg.generator.lr,
                           betas=(cfg.generator.b1, cfg.generator.b2))
    emb, labels, source = cend_batch(self.table, cfg.num_groups, cfg.cend.num_sources,
                                     cfg.cend.magnitude, cfg.cend.mode)
    self.student.eval().requires_grad_(False)
    best_loss = torch.tensor(float("inf"), device=self.device)
    best = None
    for _ in range(cfg.generator.steps):
      self.bn.stats.clear()
      with self.autocast:
        images = self.generator(emb)
        x = self._normalize(random_crop_flip(images))
        t_logits = self.teacher(x).float()
        s_logits = self.student(x).float()
      agree = s_logits.argmax(-1) == t_logits.argmax(-1)
      loss = (cfg.loss.ce * F.cross_entropy(t_logits, labels) + cfg.loss.bn * self.bn.loss()
              - cfg.loss.adv * torch.where(agree, kl_rows(t_logits, s_logits), 0.0).mean())
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      better = loss.detach() < best_loss
      best_loss = torch.where(better, loss.detach(), best_loss)
      best = images.detach() if best is None else torch.where(better, images.detach(), best)
    self.bn.end_round()
    slots = (self.cursor + torch.arange(self.syn_batch, device=self.device)) % self.bank.shape[0]
    self.bank[slots] = (best.float().clamp(0, 1) * 255).to(torch.uint8)
    self.bank_labels[slots], self.bank_source[slots] = labels, source
    self.cursor = (self.cursor + self.syn_batch) % self.bank.shape[0]
    self.student.train().requires_grad_(True)
    self.bn.enabled = False
    return best_loss

  def _group_rows(self, num_groups: int) -> torch.Tensor:
    slot = torch.randperm(self.bank.shape[0] // self.group, device=self.device)[:num_groups]
    return (slot[:, None] * self.group + torch.arange(self.group, device=self.device)).view(-1)

  def kd_step(self):
    """One KD step as bank_kd.sample_kd_batch lays it out: KL rows first, then CNCL rows."""
    cfg = self.cfg.student
    if cfg.sampler == "groups":
      idx = self._group_rows(cfg.batch_groups)
      num_kl, cncl_from = len(idx), 0
    else:  # uniform: NAYER's pool draw, with whole CNCL groups appended when CNCL is on
      num_kl = self.kd_batch
      idx = torch.randint(0, self.bank.shape[0], (num_kl,), device=self.device)
      cncl_rows = self.kd_images - num_kl
      idx = torch.cat([idx, self._group_rows(cncl_rows // self.group)])
      cncl_from = num_kl if cncl_rows else None
    with torch.no_grad():
      x = self._normalize(random_crop_flip(self.bank[idx].float() / 255))
    with self.autocast:
      with torch.no_grad():
        t_logits = self.teacher(x[:num_kl]).float()
      s_logits, features = self.student(x, return_features=True)
    t = cfg.temperature
    loss = t * t * kl_rows(t_logits / t, s_logits[:num_kl].float() / t).mean()
    if cncl_from is not None:
      rows = idx[cncl_from:]
      loss = loss + cfg.cncl_weight * cncl(features[cncl_from:], self.bank_labels[rows],
                                           self.bank_source[rows], cfg.cncl_temperature)
    self.student_opt.zero_grad(set_to_none=True)
    loss.backward()
    self.student_opt.step()
    return loss.detach()

  def kd_call(self):
    for _ in range(self.cfg.student.steps_per_call):
      loss = self.kd_step()
    return loss


def _sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
  start = time.perf_counter()
  out = fn()
  float(out)  # The result on the host: every kernel has run.
  _sync(device)
  return time.perf_counter() - start


def measure(config, teacher_arch: str, table: np.ndarray, mean, std, image_size: int,
            repeats: int = 3, device: str | None = None) -> dict[str, Any]:
  """The same phases as `jax_side.measure`, timed for the PyTorch equivalent."""
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  if device.startswith("cuda"):
    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats()
  torch.manual_seed(config.seed)
  run = TorchDFKD(config, teacher_arch, table, mean, std, image_size, device)
  dev = run.device
  first_round_s = _timed(run.generator_round, dev)
  first_kd_s = _timed(run.kd_call, dev)
  round_s = [_timed(run.generator_round, dev) for _ in range(repeats)]
  kd_s = [_timed(run.kd_call, dev) for _ in range(repeats)]
  rounds, kd_steps = config.g_loops, config.student.kd_steps

  def epoch():
    for _ in range(rounds):
      run.generator_round()
    for _ in range(kd_steps):
      loss = run.kd_step()
    return loss

  epoch_s = _timed(epoch, dev)
  g_steps, kd_per_call = config.generator.steps, config.student.steps_per_call
  round_median, kd_median = statistics.median(round_s), statistics.median(kd_s)
  return {
      "name": "PyTorch (equivalent step)",
      "device": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                 else f"cpu ({torch.get_num_threads()} threads)"),
      "torch": torch.__version__,
      "round_s": round_median,
      "kd_call_s": kd_median,
      "generator_images_per_s": run.syn_batch * g_steps / round_median,
      "student_images_per_s": run.kd_images * kd_per_call / kd_median,
      "epoch_s": epoch_s,
      "compile_s": max(first_round_s - round_median, 0.0) + max(first_kd_s - kd_median, 0.0),
      "memory": {"device_peak_bytes": (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                                       else None),
                 "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
      "repeats": {"round_s": round_s, "kd_call_s": kd_s},
  }

r"""CMI (Fang et al., IJCAI 2021) and CAE-DFKD over CMI: the paper's CMI-based ablation.

Arms after a comma (the paper's Base / +CEND / +CEND+CNCL on the CMI base):
  base       CMI: learnt z, random labels, the contrastive head and memory (methods/cmi.py)
  cend       CEND's embeddings in place of z, no CNCL (method cae_dfkd_cmi, cncl_weight 0)
  cend_cncl  CEND and CNCL on the CMI base (method cae_dfkd_cmi)

  caedfkd distill --config configs/cmi_cifar.py:cpu,base --workdir runs/cmi_r56_r20 \
      --config.teacher=teachers/resnet56 --config.eval_data=../shared/data/cifar10 \
      --config.time_budget_minutes=20

`cpu` (20 minutes on 2 cores, resnet56 -> resnet20) keeps the student side of
configs/cifar10_resnet56_resnet20.py:cpu (100-image KD batches, 60 KD steps an epoch,
16 epochs) and 100 synthetic images a round, with CMI's own ratio of generator steps to
KD steps (200 : 400, so 30 : 60) and no warm-up (CMI has none); memory and negatives are
cut to CPU size. `full` is CMI's cmi_cifar10.sh: 256 (here 250, as the CEND arms) images a
round from 200 Adam
steps (lr 1e-3), bn 1, oh 1, adv 0.5, cr 0.8, cr_T 0.2, a 40960-row memory and 4096
negatives, 400 KD steps of 256 images an epoch, 200 epochs, lr 0.1. CMI reports
94.84% for resnet34 -> resnet18 on CIFAR-10 (METHOD.md); measured figures are in
docs/results.md.
"""

from caedfkd_jax.config import defaults, fields

ARMS = {
    "base": {"method": "cmi", "student.sampler": "uniform"},
    "cend": {"method": "cae_dfkd_cmi", "cend.mode": "cend", "student.sampler": "uniform",
             "student.cncl_weight": 0.0},
    "cend_cncl": {"method": "cae_dfkd_cmi", "cend.mode": "cend", "student.sampler": "groups",
                  "student.cncl_weight": 0.5},
}


def get_config(arg: str = "cpu,base"):
  schedule, _, arm = arg.partition(",")
  arm = arm or "base"
  if schedule not in ("cpu", "full") or arm not in ARMS:
    raise ValueError(f"{arg!r}: use SCHEDULE,ARM with SCHEDULE cpu (20 minutes on 2 cores) or full "
                     f"(CMI's cmi_cifar10.sh) and ARM one of {', '.join(ARMS)}, e.g. cpu,base")
  method = ARMS[arm]["method"]
  grouped = method == "cae_dfkd_cmi"     # CEND's groups in place of CMI's z and random labels.
  config = defaults.get_config(method)
  config.teacher_arch_expected = "resnet56"
  config.student_arch = "resnet20"
  # CMI's generator side (datafree_kd.py --method cmi; scripts/cmi/cmi_cifar10.sh).
  config.generator.lr = 1e-3
  config.generator.b1, config.generator.b2 = 0.5, 0.999
  config.generator.ngf = 64
  config.loss.ce, config.loss.bn, config.loss.adv = 1.0, 1.0, 0.5
  config.loss.bn_reduce = "sum"
  config.cmi.cr, config.cmi.cr_temperature = 0.8, 0.2
  config.warmup_epochs = 0          # CMI: KD from the first round on, adversarial term included.
  config.g_loops = 1                # One round per epoch (ep_steps // kd_steps = 1).
  config.student.lr = 0.1
  config.student.temperature = 20.0
  if schedule == "full":
    config.generator.steps = 200
    if grouped:
      config.embeddings = "cifar10"
      config.num_groups = 5           # 5 x 10 x 5 = 250 images a round.
    else:
      config.cmi.synthesis_batch = 250   # CMI: 256; 250 = the CEND arms' 5 x 10 x 5, equal arms.
    config.cmi.memory_size, config.cmi.negatives = 40960, 4096
    config.student.batch_groups = 5 # 250-image KD batches (CMI: 256), in every arm.
    config.student.kd_steps = 400
    config.student.steps_per_call = 50
    config.epochs = 200
  else:
    config.generator.steps = 30
    if grouped:
      config.embeddings = "cifar10"
      config.num_groups = 2           # 2 x 10 x 5 = 100 images a round.
    else:
      config.cmi.synthesis_batch = 100
    config.cmi.memory_size, config.cmi.negatives = 4096, 512
    config.student.batch_groups = 2 # 100-image KD batches.
    config.student.kd_steps = 60
    config.student.steps_per_call = 20
    config.epochs = 16
    config.checkpoint_every_minutes = 5.0
  return fields.set_fields(config, {k: v for k, v in ARMS[arm].items() if k != "method"})

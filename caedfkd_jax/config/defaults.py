"""Defaults shared by every config in configs/: CAE-DFKD on NAYER's schedule.

Values tagged [INFERRED] come from ../shared/spec/METHOD.md's reconstruction,
not from the paper: each one is a field so that ablations can settle it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = "cae_dfkd"     # caedfkd_jax/methods/ (README "Methods"): cae_dfkd (CEND + CNCL
                                 # on the NAYER base), nayer, cmi, cae_dfkd_cmi (CEND + CNCL on
                                 # CMI). A base reads no cend.mode/magnitude or student.cncl_*.

  # Models
  config.teacher = ""            # Path of the teacher bundle (`caedfkd convert`). Required.
  config.teacher_arch_expected = ""   # If set, the teacher bundle's arch must be this.
  config.student_arch = "resnet18"
  config.compute_dtype = "auto"      # "auto": bfloat16 on GPUs/TPUs, float32 on CPUs; or
                                     # "float32" / "bfloat16". Params stay float32 either way.
  config.fuse_steps = ml_collections.config_dict.placeholder(bool)  # One lax.scan per round /
                                     # KD call. Unset: on for GPUs/TPUs, off for CPUs (XLA:CPU
                                     # runs convs inside loops ~100x slower, measured).
  config.cpu_kernels = "tuned"      # XLA:CPU kernels for the train steps: "tuned" (Eigen convs,
                                     # YNNPACK reductions and student-step elementwise fusions; faster,
                                     # same maths) or "xla_default" (XLA's own: YNNPACK convs).
                                     # See caedfkd_jax/runtime/xla_cpu.py.
  config.compilation_cache_dir = "auto"  # Persistent XLA cache, so a resumed run or a rerun
                                     # skips most compiling. "auto": ~/.cache/caedfkd_jax/xla
                                     # (or $JAX_COMPILATION_CACHE_DIR); "": off. Process-wide:
                                     # the first directory a process uses stays.

  # Embeddings and CEND (Eq. 3)
  config.embeddings = "cifar10"  # Shipped table name ("cifar10", "cifar100") or a .npy path
                                 # (X.npy with X.json), e.g. NAYER's CLIP ViT-B/32 table
                                 # ../shared/data/embeddings/cifar10_clip_vitb32.npy.
  config.cend = ml_collections.ConfigDict()
  config.cend.mode = "cend"      # "cend" | "clean" (NAYER: clean embeddings) | "gaussian" (plain noise).
  config.cend.num_sources = 4    # N; the paper's best is 4.
  config.cend.magnitude = 0.1    # M_n for every source [INFERRED].
  config.cend.magnitudes = ml_collections.config_dict.placeholder(tuple)  # One M_n per source,
                                 # e.g. '(0.1,0.2,0.05,0.1)'; overrides cend.magnitude when set.
  config.cend.magnitude_scale = "absolute"  # "absolute": M_n in the table's units; "relative":
                                 # M_n times each dimension's std across classes (cend.spread),
                                 # so one M means as much for MiniLM as for CLIP tables.
  config.cend.sources = ml_collections.config_dict.placeholder(tuple)  # None: first N of cend.NOISE_SOURCES.
  config.num_groups = 8          # Synthesis batch = num_groups * K * (N + 1) (400 for CIFAR-10, N=4).

  # Generator (NAYER's NLGenerator) and its loss (Eq. 5)
  config.generator = ml_collections.ConfigDict()
  config.generator.noise_dim = 1000      # NAYER's le_emb_size.
  config.generator.ngf = 64
  config.generator.lr = 4e-3             # NAYER 4e-3; the paper says Adam 1e-3.
  config.generator.b1 = 0.5
  config.generator.b2 = 0.999
  config.generator.steps = 30            # g_steps per round (40 for CIFAR-100).
  config.generator.life_epochs = 10      # Re-create the whole generator every g_life epochs
                                         # and g_life after the warm-up (NAYER's schedule).
  config.generator.reinit_noisy_layer = True   # NAYER: new noisy layer every round.
  config.generator.noisy_chunks = "per_view"   # One noisy Linear per K rows ("per_view", NAYER:
                                         # each CEND view its own random projection) or per CNCL
                                         # group of K*(N+1) ("per_group": an anchor and its
                                         # diffused copies differ by CEND's noise alone).
  config.loss = ml_collections.ConfigDict()
  config.loss.ce = 0.5                   # NAYER's absolute weights (CE 1, alpha 20, beta 2.66 rescaled).
  config.loss.bn = 10.0
  config.loss.bn_reduce = "sum"          # Over the teacher's BN layers: "sum" (NAYER; grows with
                                         # depth) or "mean" (one weight fits any depth).
  config.loss.adv = 1.33                 # Off during warm-up.
  config.loss.bn_momentum = 0.9          # EMA of the teacher BN input stats across rounds (0: off).
  config.low_confidence = 0.5            # Teacher confidence under which a synthetic image counts as
                                         # "low confidence" (the paper's Figure 2a statistic).

  # CMI base (methods/cmi.py; METHOD.md b.3). CMI also reads generator.steps/lr/b1/b2/ngf and
  # loss.ce/bn/adv/bn_reduce; configs/cmi_cifar.py sets CMI's own values for those.
  config.cmi = ml_collections.ConfigDict()
  config.cmi.nz = 256                    # Width of CMI's z.
  config.cmi.synthesis_batch = 256       # Images per round on the CMI base (CAE-DFKD over CMI:
                                         # num_groups * K * (N + 1), as on NAYER's base).
  config.cmi.learn_inputs = True         # Adam optimises the inputs with G (CMI's z; over CMI,
                                         # CEND's embeddings in its place [INFERRED]).
  config.cmi.cr = 0.8                    # Weight of the contrastive term L_cr.
  config.cmi.cr_temperature = 0.2        # cmi_cifar10.sh (0.1 in its adversarial script).
  config.cmi.memory_size = 40960         # Past (local || global) features kept.
  config.cmi.negatives = 4096            # Cached rows drawn as negatives each step.
  config.cmi.head_dim = 256
  config.cmi.local_scale = (0.25, 1.0)   # The local view's random-resized-crop area range.

  # Student (Eq. 6)
  config.student = ml_collections.ConfigDict()
  config.student.lr = 0.1                # [PAPER]; NAYER uses 0.2.
  config.student.momentum = 0.9
  config.student.weight_decay = 1e-4
  config.student.eta_min = 2e-4          # Cosine floor.
  config.student.batch_groups = 10       # KD batch = batch_groups * K*(N+1) images (500 for CIFAR-10).
  config.student.sampler = "groups"      # How the KD batch is drawn from the bank: "groups" (whole
                                         # CNCL groups; KL and CNCL on all of it) or "uniform"
                                         # (NAYER's pool sampling; CNCL, when on, gets its own
                                         # sub-batch of whole groups: bank_kd.sample_kd_batch).
  config.student.cncl_groups = ml_collections.config_dict.placeholder(int)  # Groups in that
                                         # CNCL sub-batch ("uniform" only). None: batch_groups,
                                         # so CNCL sees as many groups as under "groups".
  config.student.kd_steps = 400          # KD steps per epoch after warm-up.
  config.student.steps_per_call = 50     # KD steps fused into one compiled call (lax.scan).
  config.student.temperature = 20.0      # KL temperature (x t^2).
  config.student.cncl_weight = 0.5       # lambda in Eq. 6 [INFERRED]; 0 turns CNCL off.
  config.student.cncl_temperature = 0.07 # tau [INFERRED].
  config.student.cncl_form = "infonce"   # "infonce" | "supcon".
  config.student.cncl_same_group = False # Restrict positives to the anchor's own group.

  # Schedule
  config.epochs = 120                    # Including warm-up (NAYER: 120/220/320).
  config.warmup_epochs = 20              # Generator only; no KD, no adversarial term.
  config.g_loops = 2                     # Generator rounds per epoch after warm-up.
  config.warmup_g_loops = 10             # ... and during warm-up.
  config.bank_capacity = 0               # Images kept; 0 = every image the schedule makes.

  # Evaluation
  config.eval_data = ""                  # Data spec for periodic evaluation (see `caedfkd evaluate`).
  config.eval_split = "test"
  config.eval_every_epochs = 1
  config.eval_batch_size = 500

  # Checkpointing
  config.checkpoint_every_minutes = 10.0 # Also at every epoch's end.
  config.max_checkpoints = 2
  config.time_budget_minutes = 0.0       # Stop cleanly once the run (all its invocations
                                         # together) has taken this many minutes (0: no limit).
  config.max_units = 0                   # Stop cleanly after this many units (rounds or KD calls)
                                         # in this invocation (0: no limit); for smoke tests.
  config.stop_after_epochs = 0           # Stop cleanly, evaluated, once this many epochs are done
                                         # (0: run to `epochs`). The schedule still spans `epochs`:
                                         # accuracy at epoch k of a long run costs k epochs, and
                                         # rerunning with 0 continues the same run.
  config.allow_config_change = False     # Resume a workdir with changed hyper-parameters (the
                                         # changes go into the student bundle). Shapes and the
                                         # teacher can never change on a resume.

  # Many runs in one program (runs.py): seeds seed..seed+num_runs-1 at every sweep point.
  config.num_runs = 1                    # R runs differing only in seed; >1 adds a run axis.
  config.sweep = ""                      # Float fields swept in the same program, traced:
                                         # "student.cncl_weight=0,0.5;loss.bn=5,10" (grid).
  config.runs_vectorized = ml_collections.config_dict.placeholder(bool)  # jax.vmap over runs.
                                         # Unset: on for GPUs/TPUs; off for CPUs, where runs are
                                         # traced one after another in the program (vmapped convs
                                         # ran 3.4x slower per run on XLA:CPU, measured).
  config.accuracy_levels = (0.5, 0.75, 0.9)  # Summary: time to these fractions of the teacher's
                                         # top-1 on eval_data.

  # Logging
  config.grid_images_per_class = 8       # PNG grid of synthetic images per epoch.

  # Multi-host (README "Multi-host"): every process runs the same command, its own process_id.
  config.num_devices = 0                 # Data-parallel over the first N devices (one process);
                                         # 0: every device.
  config.distributed = False             # Call jax.distributed.initialize() before any JAX work.
  config.coordinator_address = ""        # "HOST:PORT" of process 0; "": $JAX_COORDINATOR_ADDRESS
                                         # or auto-detected (SLURM, Open MPI, Cloud TPU, k8s).
  config.num_processes = ml_collections.config_dict.placeholder(int)  # None: auto-detected.
  config.process_id = ml_collections.config_dict.placeholder(int)     # 0..num_processes-1;
                                         # None: auto-detected.

  # CPSC-DFKD (methods/cpsc_dfkd.py; METHOD.md b.5): its own loop, generator and weights.
  # It reads student.lr/momentum/weight_decay and epochs, and no generator.*, loss.*, cend.*
  # or bank field; warmup_epochs must be 0 (its warm-up is the student LR's). Defaults: the
  # authors' README run (CPSC_DFKD.py at 1c6ade1); configs/cpsc_cifar.py sets the rest.
  config.cpsc = ml_collections.ConfigDict()
  config.cpsc.epoch_itrs = 50            # (generator, student) iterations per epoch.
  config.cpsc.g_steps = 6                # Generator steps per iteration (README; code default 1).
  config.cpsc.s_steps = 5                # Student steps per iteration.
  config.cpsc.batch_size = 512           # Fresh z and labels per step, generator and student.
  config.cpsc.nz = 256                   # Width of z.
  config.cpsc.ngf = 64                   # GeneratorD's width.
  config.cpsc.generator_lr = 1e-3        # Adam, betas (generator_b1, generator_b2).
  config.cpsc.generator_b1 = 0.5
  config.cpsc.generator_b2 = 0.999
  config.cpsc.alpha = 5.0                # IKD (logit discrepancy) weight.
  config.cpsc.beta = 1.0                 # Teacher BN-statistics weight (summed over layers).
  config.cpsc.gamma = 0.7                # SupCon weight, [student, teacher] features as 2 views.
  config.cpsc.eta = 0.7                  # CE-to-the-sampled-label weight.
  config.cpsc.temperature = 0.07         # SupCon's tau.
  config.cpsc.generator_ikd = "mse"      # losses.IKD_FORMS. Code: "log_mse" on CIFAR-10 (set by
  config.cpsc.student_ikd = "mse"        # configs/cpsc_cifar.py), "mse" elsewhere, as the paper;
                                         # the student's CIFAR-10 form is "log_l2".
  config.cpsc.ce_on_probabilities = True # Code: CE(softmax(logits), y), softmax twice; the paper's
                                         # CE on logits is False.
  config.cpsc.reset_generator_adam_every_step = True  # Code: a new Adam at every generator
                                         # step (its first, sign-like step each time); False:
                                         # one Adam for the whole run.
  config.cpsc.student_bn_train_in_generator_steps = True  # Code: the student stays in train
                                         # mode: batch statistics, running averages updated on
                                         # the generator's batches too. False: eval mode there.
  config.cpsc.adapter = "none"           # Student-feature head to the teacher's width for
                                         # SupCon: "none", "mlp" (code, WRN-16-1/40-1 students)
                                         # or "linear"; fixed random, never trained (as the code).
  config.cpsc.lr_warmup_epochs = 10      # Student LR: lr * e / W for epochs e = 1..W, then
                                         # cosine to 0 over `epochs`, stepped per epoch (code).

  # DiffDFKD (methods/diffdfkd.py; METHOD.md b.6): Stable Diffusion v1.x steered by the
  # teacher. Its loss weights are loss.ce / loss.bn / loss.adv (the code's oh / bn / adv);
  # KD reads student.* with the batch below; the epoch plan is NAYER's (warm-up rounds
  # without L_adv, then g_loops synthesis rounds and the KD calls). configs/diffdfkd_cifar.py
  # sets the paper's CIFAR values.
  config.diffdfkd = ml_collections.ConfigDict()
  config.diffdfkd.weights = ""               # Bundle from `caedfkd convert-diffusion SD_DIR`.
  config.diffdfkd.prompt = "a realistic photo of {class}"
  config.diffdfkd.steps = 10                 # Denoising steps (CIFAR: 10; DomainNet: 70).
  config.diffdfkd.guidance_scale = 3.0       # Classifier-free guidance (CIFAR: 3; DomainNet: 7).
  config.diffdfkd.latent_size = 64           # Latent side: 64 -> 512-px images in SD v1.x.
  config.diffdfkd.batch = 10                 # Images per synthesis round (the code: 1).
  config.diffdfkd.one_class_per_round = True # A round is one class, the classes in turn (the
                                             # code); False: every row its own class in turn.
  config.diffdfkd.latent_lr = 1.0            # z <- z - latent_lr * dL/dz (the code: 1).
  config.diffdfkd.grad_through_unet = True   # The paper; False: the UNet's eps held fixed.
  config.diffdfkd.latent_mix = "cutmix"      # cutmix (the paper), mixup, none (code default).
  config.diffdfkd.mix_every = 0              # Steps between mixes; 0: steps // 5 (the code).
  config.diffdfkd.mix_alpha = 1.0            # lam0 ~ Beta(a, a), lam ~ Beta(lam0, lam0) (code).
  config.diffdfkd.kd_batch = 256             # Bank images per KD step (the code: 256).
  config.diffdfkd.attention = "xla"          # UNet attention: xla (T x T logits per head) or
                                             # cudnn (fused flash attention; GPU, bf16; not yet
                                             # run on a GPU here).
  return config

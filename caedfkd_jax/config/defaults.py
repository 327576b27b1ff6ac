"""The engine's config fields and those several methods share: CAE-DFKD on NAYER's schedule.

A method's own section (`cmi`, `cpsc`, `diffdfkd`) is declared in its file (`Method.own_config`)
and joins the config when that method is named: `get_config("cmi")`, or `--config.method=cmi`
at the start of a run. Which shared fields a method reads, its `Method.reads` says; the engine
reads `ENGINE_FIELDS`. Values tagged [INFERRED] come from ../shared/spec/METHOD.md's
reconstruction, not from the paper: each one is a field so that ablations can settle it.
"""

import ml_collections

DEFAULT_METHOD = "cae_dfkd"

# The fields the engine reads, whatever the method (the rest of this file is the methods').
ENGINE_FIELDS = frozenset({
    "seed", "method", "teacher", "teacher_arch_expected", "student_arch", "compute_dtype",
    "fuse_steps", "cpu_kernels", "compilation_cache_dir", "epochs", "eval_data", "eval_split",
    "eval_allow_class_mismatch",
    "eval_every_epochs", "eval_batch_size", "checkpoint_every_minutes", "max_checkpoints",
    "time_budget_minutes", "max_units", "stop_after_epochs", "allow_config_change", "num_runs",
    "sweep", "runs_vectorized", "accuracy_levels", "grid_images_per_class", "num_devices",
    "distributed", "coordinator_address", "num_processes", "process_id"})


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
  """The defaults for `method` (None: cae_dfkd, which has no section of its own, imported by
  nothing); a named method's own sections are added from its file."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = method or DEFAULT_METHOD  # caedfkd_jax/methods/NAME.py (docs/methods.md "Methods"):
                                 # cae_dfkd (CEND + CNCL on the NAYER base), nayer, cmi,
                                 # cae_dfkd_cmi, cpsc_dfkd, diffdfkd. Each reads the fields its
                                 # `reads` names; setting one it does not read is refused.

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
  config.num_groups = 8          # Synthesis batch = num_groups * C * (N + 1) (400 for CIFAR-10, N=4).
  config.classes_per_group = 0   # C: classes in one CNCL group; 0: all K (every class in every
                                 # group, the paper's layout). A divisor C < K samples them from
                                 # a shuffled cycle (synthesis/class_cycle.py), so that hundreds
                                 # of classes fit a batch: K / C groups cover every class once.

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
  config.generator.flip = True           # Random horizontal flip in the generator loss's
                                         # augmentation (NAYER: on for CIFAR, off for
                                         # Tiny-ImageNet and ImageNet).
  config.generator.noisy_chunks = "per_view"   # One noisy Linear per C rows ("per_view", NAYER:
                                         # each CEND view its own random projection) or per CNCL
                                         # group of C*(N+1) ("per_group": an anchor and its
                                         # diffused copies differ by CEND's noise alone).
  config.loss = ml_collections.ConfigDict()
  config.loss.ce = 0.5                   # NAYER's absolute weights (CE 1, alpha 20, beta 2.66 rescaled).
  config.loss.bn = 10.0
  config.loss.bn_reduce = "sum"          # Over the teacher's BN layers: "sum" (NAYER; grows with
                                         # depth) or "mean" (one weight fits any depth).
  config.loss.adv = 1.33                 # Off during warm-up.
  config.loss.bn_momentum = 0.9          # EMA of the teacher BN input stats across rounds (0: off).
  config.student_train_mode_in_rounds = False  # NAYER's code: student.train() after each round,
                                         # so an epoch's later rounds compute L_adv with the
                                         # student's batch statistics and move its running ones.
                                         # False: eval mode throughout (the paper's reading).
  config.low_confidence = 0.5            # Teacher confidence under which a synthetic image counts as
                                         # "low confidence" (the paper's Figure 2a statistic).

  # Student (Eq. 6)
  config.student = ml_collections.ConfigDict()
  config.student.lr = 0.1                # [PAPER]; NAYER uses 0.2.
  config.student.momentum = 0.9
  config.student.weight_decay = 1e-4
  config.student.eta_min = 2e-4          # Cosine floor.
  config.student.batch_groups = 10       # KD batch = batch_groups * C*(N+1) images (500 for CIFAR-10).
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
  # The paper's Table I baselines on the NAYER base (image-level tricks it reports hurt); without
  # CNCL. Their values are [INFERRED]: the table gives none.
  config.student.mixup_alpha = 0.0       # Mixup of the KD batch's images, lam ~ Beta(a, a), the
                                         # teacher labelling the mixed images; 0: off.
  config.student.image_contrastive_weight = 0.0  # SimCLR's NT-Xent on two augmented views of
                                         # each KD image (student features); 0: off.
  config.student.image_contrastive_temperature = 0.07  # Its tau (CNCL's, for comparability).

  # Schedule
  config.epochs = 120                    # Including warm-up (NAYER: 120/220/320).
  config.warmup_epochs = 20              # Generator only; no KD, no adversarial term.
  config.g_loops = 2                     # Generator rounds per epoch after warm-up.
  config.warmup_g_loops = 10             # ... and during warm-up.
  config.bank_capacity = 0               # Images kept; 0 = every image the schedule makes.

  # Evaluation
  config.eval_data = ""                  # Data spec for periodic evaluation (see `caedfkd evaluate`).
  config.eval_split = "test"
  config.eval_allow_class_mismatch = False  # Score eval_data even when its class names are not
                                         # the teacher's (in label order); refused by default.
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

  # Multi-host (docs/multihost.md): every process runs the same command, its own process_id.
  config.num_devices = 0                 # Data-parallel over the first N devices (one process);
                                         # 0: every device.
  config.distributed = False             # Call jax.distributed.initialize() before any JAX work.
  config.coordinator_address = ""        # "HOST:PORT" of process 0; "": $JAX_COORDINATOR_ADDRESS
                                         # or auto-detected (SLURM, Open MPI, Cloud TPU, k8s).
  config.num_processes = ml_collections.config_dict.placeholder(int)  # None: auto-detected.
  config.process_id = ml_collections.config_dict.placeholder(int)     # 0..num_processes-1;
                                         # None: auto-detected.

  if method is not None:
    add_method_sections(config)
  return config


def add_method_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the own sections of `config.method` that it lacks, at their defaults (a run
  whose method was set by `--config.method` on a config made for another)."""
  from caedfkd_jax.methods import registry   # Imports the method, so JAX: only when named.
  own = registry.get(config.method).own_config
  missing = {k: v for k, v in (own() if own else {}).items() if k not in config}
  if missing:
    with config.unlocked():
      for section, values in missing.items():
        config[section] = values
  return config

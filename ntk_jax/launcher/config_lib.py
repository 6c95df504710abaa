"""Building blocks of the ``configs/*.py`` files (big_vision style: each config file has a
``get_config()`` that starts from :func:`base_config` and states the values its job needs,
with the reason for each). The sections here hold the defaults that tests and the other
jobs start from.

Every field the launcher reads is defined here, so ``--config.x.y=...`` on an unknown key is
an error (the launcher locks the config). Every field can be set on the command line: sequences
are tuples (``--config.select_compare.seeds='(0,1)'``; ``'[0,1]'`` and repeated flags also
work) and optional sequences are ``placeholder(tuple)`` fields (``lora.layers``: ``None`` = all
layers; ``--config.stability.lora.layers='(0,2)'``). ``tests/test_config_overrides.py`` checks
this for every ``configs/*.py``.
"""
from __future__ import annotations

import ml_collections

from ntk_jax.models.lora import lora_config  # noqa: F401  (a building block of the configs)
from ntk_jax.selection.methods import get_method, method_names
from ntk_jax.training.trainer import finetune_train_config  # noqa: F401

# The validation experiments the default job runs (docs/theory.md §5). Any job with a section in
# SECTIONS below can be listed in ``config.experiments``.
EXPERIMENTS = ("stability", "spectrum", "approximation")

# The tasks the embedded default model is pre-trained on (ntk_jax.data.synthetic.TASKS).
PRETRAIN_TASKS = ("add", "sub", "copy", "reverse", "sort", "count", "sentiment", "parity")


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # A local directory with config.json + weights (+ tokenizer). Empty: the embedded
        # default model, pre-trained by the job itself into WORKDIR/base_model.
        # "packaged:<name>": a checkpoint shipped in an installed package
        # (ntk_jax.models.packaged, e.g. "packaged:all-MiniLM-L6-v2").
        path="",
        # What the validation experiments (stability, spectrum, approximation) run
        # (experiments/backends.py): "lm" — the causal LM on the synthetic tasks, kernel over
        # response-position-mean logits; "classification" — a BERT/RoBERTa checkpoint with a new
        # num_labels-way head on the lexicon task (config.lexicon), kernel over the class logits.
        task="lm",
        num_labels=2,               # classification: size of the new head
        train_head=False,           # classification: train the head (and take the kernel over it) too
        # Architecture of the embedded default model (ntk_jax.models.transformer.DecoderConfig).
        arch=dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=128,
                  max_position_embeddings=64, rope_theta=10000.0),
        # Compute / parameter dtypes the experiments load the model with ("bfloat16" compute
        # keeps norms, softmax and logits in float32). Empty: the checkpoint config's.
        dtype="float32",
        param_dtype="float32",
    ))


def pretrain_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        tasks=PRETRAIN_TASKS,
        n_per_task=1500,
        max_len=32,
        train=dict(learning_rate=3e-3, warmup_steps=50, total_steps=800, schedule="cosine",
                   weight_decay=0.01, grad_clip=1.0, batch_size=64, seed=0, eval_every=0,
                   checkpoint_every=200, log_every=20, max_to_keep=1),
    ))


def stability_config() -> ml_collections.ConfigDict:
    """docs/theory.md §5.1: Θ_t on a fixed probe set during LoRA fine-tuning."""
    return ml_collections.ConfigDict(dict(
        task="add_spaced",          # fine-tuning task (not in the pre-training mix)
        n_train=512,
        n_probe=16,
        kernel_every=10,            # compute Θ_t every this many steps
        # B ~ N(0, b_init_std²) instead of B = 0, so the gradient w.r.t. A (and Θ_0) is not
        # degenerate at step 0 (docs/theory.md §3.4).
        lora=lora_config(b_init_std=0.02),
        train=finetune_train_config(total_steps=100, learning_rate=2e-3),
        epsilon=0.01,               # the NTK-like threshold checked in the report (S ≥ 1-ε)
        # S_min map: one more run per learning rate (at lora.rank) and per LoRA rank (at
        # train.learning_rate); empty: only the base run
        sweep_learning_rates=(),
        sweep_ranks=(),
    ))


def spectrum_config() -> ml_collections.ConfigDict:
    """docs/theory.md §5.2: κ and risk bounds over LoRA placements, then fine-tune each."""
    return ml_collections.ConfigDict(dict(
        task="sentiment_flipped",  # labels opposite to pre-training: fine-tuning must move
        n_kernel=32,                # examples in the kernel (the paper: 32)
        sigma=1e-4,                 # ridge (the paper: 1e-4)
        # (targets, layers) sweep, after the paper's Table 1: a tuple of plain dicts, so
        # --config.spectrum.placements="({'targets': ('k_proj',), 'layers': (0,)},)" sets it
        placements=(
            dict(targets=("q_proj", "v_proj"), layers=(0,)),
            dict(targets=("q_proj", "v_proj"), layers=(0, 2)),
            dict(targets=("q_proj", "v_proj"), layers=(0, 1, 2)),
            dict(targets=("k_proj",), layers=(0,)),
            dict(targets=("k_proj",), layers=(0, 2)),
            dict(targets=("k_proj",), layers=(0, 1, 2)),
        ),
        lora=lora_config(),
        n_train=256,
        n_eval=256,
        train=finetune_train_config(total_steps=60),
        n_random_kernels=500,       # random PSD kernels for the printed-bound failure rate
    ))


def approximation_config() -> ml_collections.ConfigDict:
    """docs/theory.md §5.3: Jacobian-free Θ̃ vs exact tr Θ, and cross-output terms vs width."""
    return ml_collections.ConfigDict(dict(
        tasks=PRETRAIN_TASKS,
        n_examples=48,              # all pairs of these examples are compared
        projection_dims=(1024, 8192),
        lora=lora_config(targets=("q_proj", "v_proj"), b_init_std=0.02),
        widths=(16, 32, 64, 128),   # hidden sizes of fresh (random-init) models for the scaling
        n_width_examples=8,
        block_size=16,              # examples per kernel block (bounds memory; each block shape compiles once)
    ))


def lexicon_config() -> ml_collections.ConfigDict:
    """The real-word task of ``config.model.task="classification"`` (ntk_jax.data.lexicon):
    VADER lexicon words with human valence labels in sentence templates."""
    return ml_collections.ConfigDict(dict(
        max_len=16,                 # tokens per sentence ([CLS] ... [SEP], right-padded; never truncated)
        min_abs_valence=1.5,        # keep clearly positive / negative words
        max_pieces=1,               # keep words the tokenizer holds as at most this many WordPiece pieces
    ))


def gradex_config() -> ml_collections.ConfigDict:
    """docs/theory.md §6.4: first-order subset estimation (GradEx) over synthetic auxiliary tasks,
    checked against real LoRA fine-tuning on a few subsets (experiments/gradex.py)."""
    return ml_collections.ConfigDict(dict(
        target="add_spaced",        # target task (not in the pre-training mix)
        aux_tasks=("add", "sub", "copy", "reverse", "sort", "count", "sentiment", "parity",
                   "sentiment_flipped", "add_mod10", "noise"),
        n_train_per_task=256,       # training examples per auxiliary task (meta-init, fits, fine-tunes)
        n_target_train=0,           # target examples added to every subset (0: auxiliary tasks only)
        n_target_eval=128,          # target examples the target loss is measured on
        lora=lora_config(),
        meta_train=finetune_train_config(total_steps=300, learning_rate=2e-3, warmup_steps=20,
                                         schedule="cosine", batch_size=32, checkpoint_every=100,
                                         log_every=10),
        finetune=finetune_train_config(total_steps=60),  # the real fine-tunes, from θ*
        projection_dim=200,         # d (the paper's code: 100-400)
        projection_seed=0,
        projection_kind="rademacher",
        projection_type="dense",    # or "factored" (per-layer Kronecker map; docs/kernels.md)
        clip_eps=1e-4,              # q clipped to [eps, 1-eps] in f = mean log(q/(1-q))
        # Logistic fit: sum of the subset's losses + |w|^2/(2C). C sets the size of Δ (nothing is
        # rescaled). With calibrate_C, C is picked from C_grid on n_calibrate extra really
        # fine-tuned subsets (never used for the error check; their cost counts in the timing);
        # otherwise C is used as given. C_grid also gives a post-hoc sensitivity table.
        C=1e-3,
        calibrate_C=True,
        n_calibrate=2,
        C_grid=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0),
        feature_batch_size=64,
        shard_size=256,             # features in resumable shards of this many examples (features/)
        eval_batch_size=128,
        n_subsets=200,              # random ensemble size m
        subset_prob=0.5,
        keep_fraction=0.3,          # top fraction of tasks kept by the ensemble scores
        greedy=True,                # also greedy forward selection on the estimates
        ridge_lambda=1.0,           # ridge surrogate on subset indicators
        surrogate_holdout=0.2,      # fraction of the ensemble held out for the surrogate's Spearman
        n_verify=6,                 # subsets really fine-tuned (evenly spaced ranks of the estimate)
        verify_selected=True,       # also fine-tune the selected and the greedy subsets
    ))


def advise_placement_config() -> ml_collections.ConfigDict:
    """docs/theory.md §6.8: rank LoRA placements by a predictor from the eNTK at θ_0, optionally
    validated against real fine-tunes (experiments/advise_placement.py)."""
    return ml_collections.ConfigDict(dict(
        task="sentiment_flipped",   # two-label task (lm backend; the lexicon for classification)
        # candidate placements: plain dicts {'targets', 'layers'[, 'rank']}, as spectrum.placements
        placements=tuple(dict(targets=t, layers=l) for t in (("q_proj", "v_proj"), ("k_proj",))
                         for l in ((0,), (0, 1, 2))),
        predictor="lin_eval_loss_ce",  # a name of ntk_jax.kernels.placement.PREDICTORS (or num_params)
        n_kernel=32,                # training inputs of the kernel
        n_kernel_test=32,           # held-out inputs of the test-train kernel
        sigma=1e-4,                 # ridge of κ and R
        # traced kernel over O outputs from k random ±1 output probes (unbiased; k VJPs instead of
        # O); 0 or k >= O: exact
        output_probes=8,
        lora=lora_config(),
        train=finetune_train_config(total_steps=60),  # the fine-tuning job the advice is for
        validate=False,             # also fine-tune every placement over seeds and rank-correlate
        seeds=(0, 1, 2),            # validation seeds (without validate: the job's seed)
        n_train=256,
        n_eval=256,
        n_boot=1000,                # bootstrap draws over placements
    ))


def prune_lpntk_config() -> ml_collections.ConfigDict:
    """docs/theory.md §6.3: lpNTK farthest-point-clustering pruning vs random pruning
    (experiments/prune_lpntk.py)."""
    return ml_collections.ConfigDict(dict(
        # Labelled synthetic task; classes = its distinct responses. sentiment_flipped: the
        # pre-trained model predicts the opposite label, so LoRA must learn the task.
        # (add_mod10, 10 classes, stays near chance with this model and budget.)
        task="sentiment_flipped",
        n_train=400,
        n_val=200,                  # checkpoint selection (never the test split)
        n_test=400,
        label_noise=0.2,            # fraction of training labels flipped to another class
        lora=lora_config(),
        reference_train=finetune_train_config(total_steps=150, learning_rate=3e-3, warmup_steps=10,
                                              schedule="cosine", batch_size=32, checkpoint_every=50,
                                              log_every=10),
        retrain=finetune_train_config(total_steps=100, learning_rate=3e-3, warmup_steps=10,
                                      schedule="cosine", batch_size=32, log_every=50),
        eval_every=10,              # validation accuracy every this many retrain steps
        keep_ratios=(0.1, 0.3),
        modes=("centres", "random_member", "drop_largest_half"),
        seeds=(0, 1, 2),
        projection_dim=0,           # 0: exact features (LoRA P is small); else JL dimension
        projection_seed=0,
        projection_type="dense",    # or "factored" (per-layer Kronecker map; docs/kernels.md)
        feature_batch_size=64,
        shard_size=256,             # features in resumable shards of this many examples (features/)
    ))


def select_config() -> ml_collections.ConfigDict:
    """docs/theory.md §6.1/§6.2: one data-selection job (experiments/select.py); also the per-method
    settings the comparison (select_compare) uses."""
    c = ml_collections.ConfigDict(dict(
        method="ntk",               # a module of ntk_jax.selection.methods: ntk | less | random | embedding
        n_select=64,                # N
        # JSONL files or local HF datasets dirs; empty: the controlled benchmark
        # (ntk_jax.data.controlled), generated into the job's directory.
        domain_path="",
        pool_path="",
        test_path="",
        # the controlled benchmark: a target of ntk_jax.data.controlled.TARGETS; variant
        # "contradicting" (the pool also holds conflicting families) or "no_conflict"
        benchmark=dict(target="flipped_sentiment", n_domain=32, n_test=256, n_pool_per_family=64,
                       variant="contradicting"),
        # The selection jobs' encoding (select, select_compare, select_suite; pretrain.max_len is
        # the embedded model's pre-training length only). max_len: tokens per encoded record
        # (bos + prompt/rendering + eos); 32 = the embedded model's, which the controlled
        # benchmark's records fit.
        max_len=32,
        # Records longer than max_len, checked over every record before any model work (counts
        # in report.json "data.lengths"): "error" stops naming the record's file: line, its
        # length and what each other policy would do; "left" drops leading prompt tokens and
        # keeps the response; "right" keeps the first max_len tokens; "drop" skips the record.
        # left/right drop the records they cannot fit (response alone too long / prompt fills
        # max_len). Default "error": the controlled benchmark never exceeds max_len, and a user's
        # own pool is told at once, before any model is loaded (the 8B configs use "left").
        truncation="error",
        # messages records: the loss on every assistant turn ("all") or on the last one ("last")
        assistant_turns="all",
        lora=lora_config(),
        warmup=finetune_train_config(total_steps=40, learning_rate=5e-3, batch_size=16),
        knn_k=32,                   # votes per domain example (coarse filter)
        projection_dim=8192,        # p
        projection_seed=0,
        # "dense": a Rademacher (P, p) matrix (the paper's); "factored": per-layer Kronecker
        # factors of the layers' inputs and output gradients (LoGra; docs/kernels.md), which
        # never form a per-example gradient. LESS needs "dense".
        projection_type="dense",
        shard_size=128,             # candidates per ScoreStore shard
        feature_batch_size=64,
        # scoring/embedding in length buckets: widths rounded up to this multiple (at most
        # max_len / bucket_multiple compiled shapes); 0 pads every candidate to max_len
        bucket_multiple=16,
    ))
    # each method's own section (select.<method>), from its module (ntk_jax.selection.methods)
    for name in method_names():
        method = get_method(name)
        if method.config is not None:
            c[name] = method.config()
    return c


def select_compare_config() -> ml_collections.ConfigDict:
    """docs/theory.md §7.2 (docs/selection.md): domain-only vs domain ∪ selected(method) over seeds
    (experiments/select_compare.py); selection settings come from ``config.select``."""
    return ml_collections.ConfigDict(dict(
        methods=("random", "embedding", "less", "ntk"),
        # controlled benchmark only: arms "oracle_<role>" train on domain ∪ N pool items of that
        # role (the best / worst a selector of N items can do)
        oracles=("useful", "conflicting"),
        seeds=(0, 1, 2),
        lora=lora_config(),
        # the benchmark's documented setting (ntk_jax.data.controlled.FINETUNE)
        finetune=finetune_train_config(total_steps=150, learning_rate=5e-3, warmup_steps=5, batch_size=16),
        eval_batch_size=128,
    ))


def select_suite_config() -> ml_collections.ConfigDict:
    """The benchmark suite (experiments/select_suite.py): every target × variant, each cell a
    comparison with the arms, seeds and fine-tuning of ``select_compare``."""
    return ml_collections.ConfigDict(dict(
        targets=(),                 # names of ntk_jax.data.controlled.TARGETS; empty: all of them
        variants=("no_conflict", "contradicting"),
    ))


def distributed_config() -> ml_collections.ConfigDict:
    """``jax.distributed`` settings (see :mod:`ntk_jax.launcher.distributed`)."""
    return ml_collections.ConfigDict(dict(
        mode="auto",                # auto | on | off
        coordinator_address="",     # host:port of process 0 (or JAX_COORDINATOR_ADDRESS)
        num_processes=0,            # 0: from JAX_NUM_PROCESSES / the cluster
        process_id=-1,              # -1: from JAX_PROCESS_ID / the cluster
        cpu_collectives="gloo",     # CPU backend's cross-process collectives ("" = JAX default)
        # seconds without a heartbeat after which a process counts as dead: the others then stop
        # at their next barrier with an error saying how to resume (JAX's default: 100)
        heartbeat_timeout_s=100,
    ))


def mesh_config() -> ml_collections.ConfigDict:
    """The device mesh each process builds from its local devices (``jax.local_devices()``):
    ``data`` × ``model``, one of them -1 for all the devices the other leaves
    (:func:`ntk_jax.models.sharding.mesh_from_config`; a size that does not fit the local
    device count is a ``ValueError``). Models are loaded onto it (weights FSDP over ``data``,
    tensor parallel over ``model``), and features, JVP scores, hidden states, training and
    evaluation split their batches over ``data``. On one device nothing is placed."""
    return ml_collections.ConfigDict(dict(data=-1, model=1))


# Job name (``experiments/<name>.py``) -> builder of its config section ``config.<name>``.
# A new job adds its ``<name>_config()`` here; every section is always present, so any
# ``--config.<name>.<key>=...`` override is checked against the defaults.
SECTIONS = {
    "stability": stability_config,
    "spectrum": spectrum_config,
    "approximation": approximation_config,
    "gradex": gradex_config,
    "prune_lpntk": prune_lpntk_config,
    "select": select_config,
    "select_compare": select_compare_config,
    "select_suite": select_suite_config,
    "advise_placement": advise_placement_config,
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiments = EXPERIMENTS
    c.seed = 0
    c.enable_x64 = False
    c.model = model_config()
    c.pretrain = pretrain_config()
    c.lexicon = lexicon_config()
    c.distributed = distributed_config()
    c.mesh = mesh_config()
    for name, section in SECTIONS.items():
        c[name] = section()
    return c

"""Building blocks of the ``configs/*.py`` files (big_vision style: each config file has a
``get_config()`` that starts from :func:`base_config` and states the values its job needs,
with the reason for each). The sections here hold the defaults shared by the jobs (model,
pre-training, mesh, ...); each experiment's own section comes from its module's ``config()``
(``experiments/<name>.py``, found by :mod:`ntk_jax.launcher.discovery`).

Every field the launcher reads has a default in :func:`base_config`, so ``--config.x.y=...`` on an unknown key is
an error (the launcher locks the config). Every field can be set on the command line: sequences
are tuples (``--config.select_compare.seeds='(0,1)'``; ``'[0,1]'`` and repeated flags also
work) and optional sequences are ``placeholder(tuple)`` fields (``lora.layers``: ``None`` = all
layers; ``--config.stability.lora.layers='(0,2)'``). ``tests/test_config_overrides.py`` checks
this for every ``configs/*.py``.
"""
from __future__ import annotations

import ml_collections

from ntk_jax.launcher import discovery
from ntk_jax.models.lora import lora_config
from ntk_jax.training.trainer import finetune_train_config

# The validation experiments the default job runs (docs/theory.md §5). Any job with a section
# (:func:`sections`) can be listed in ``config.experiments``.
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
        # (experiments/model_tasks.py): "lm" — the causal LM on the synthetic tasks, kernel over
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
    judged against real LoRA fine-tunes and the trivial estimators (experiments/gradex.py,
    docs/gradex.md)."""
    return ml_collections.ConfigDict(dict(
        target="add_spaced",        # target task (not in the pre-training mix)
        aux_tasks=("add", "sub", "copy", "reverse", "sort", "count", "sentiment", "parity",
                   "sentiment_flipped", "add_mod10", "noise"),
        seeds=(0, 1, 2),            # replicates: each its own data draw, θ*, projection and subsets (seed_<s>/)
        n_train_per_task=256,       # training examples per auxiliary task (meta-init, fits, fine-tunes)
        n_target_train=0,           # target examples added to every subset (0: auxiliary tasks only)
        n_target_eval=128,          # target examples the target loss is measured on
        lora=lora_config(),
        meta_train=finetune_train_config(total_steps=300, learning_rate=2e-3, warmup_steps=20,
                                         schedule="cosine", batch_size=32, checkpoint_every=100,
                                         log_every=10),
        finetune=finetune_train_config(total_steps=60),  # the real fine-tunes, from θ*
        projection_dim=200,         # d (the paper's code: 100-400)
        projection_seed=0,          # + the replicate's seed
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
        ridge_lambda=1.0,           # ridge surrogate on subset indicators (of the estimates)
        surrogate_holdout=0.2,      # fraction of the ensemble held out for the surrogate's Spearman
        n_verify=24,                # subsets really fine-tuned per seed (evenly spaced ranks of the estimate)
        verify_shard_size=4,        # fine-tunes per resumable store shard (verify_*/, calibrate_*/, compare_*/)
        compare_selection=True,     # fine-tune the selected, greedy, all-task and random same-size subsets
        n_random_compare=4,         # random subsets of the selected size in that check, per seed
        baseline_lambdas=(0.01, 0.1, 1.0, 10.0, 100.0),  # λ grid of the leave-one-out ridge baselines
        baseline_few=8,             # the indicator ridge also fitted on only this many real fine-tunes
        n_boot=1000,                # bootstrap resamples of every interval
    ))


def prune_lpntk_config() -> ml_collections.ConfigDict:
    """docs/theory.md §6.3: lpNTK farthest-point-clustering pruning vs random pruning
    (experiments/prune_lpntk.py)."""
    return ml_collections.ConfigDict(dict(
        # "text": LoRA classifier on `task`; "digits": a LeNet-like CNN on scikit-learn's 8x8
        # digits (configs/prune_lpntk_digits.py), every parameter trained
        dataset="text",
        # Labelled synthetic task; classes = its distinct responses. sentiment_flipped: the
        # pre-trained model predicts the opposite label, so LoRA must learn the task.
        # (add_mod10, 10 classes, stays near chance with this model and budget.)
        task="sentiment_flipped",
        n_train=400,                # digits: 0 = every image not in val / test
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
        kernels=("lpntk",),         # ntk_jax.selection.lpntk.KERNELS: + "sum_logits" (the paper's ablation)
        baselines=("random",),      # + "el2n", "grand" (ntk_jax.selection.pruning_scores)
        score_runs=3,               # EL2N / GraNd: averaged over this many short runs ...
        score_steps=20,             # ... of this many steps of the retrain schedule
        digits=dict(split_seed=0, cnn=dict(channels=(16, 32), hidden=64)),  # dataset="digits" only
        projection_dim=0,           # 0: exact features (LoRA P is small); else JL dimension
        projection_seed=0,
        projection_type="dense",    # or "factored" (per-layer Kronecker map; docs/kernels.md)
        feature_batch_size=64,
        shard_size=256,             # features in resumable shards of this many examples (features/)
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


def preflight_config() -> ml_collections.ConfigDict:
    """The memory preflight (:mod:`ntk_jax.launcher.preflight`): before the model is loaded,
    the per-device peak of the programs the experiments declare is estimated for the job's mesh,
    batch sizes and dtypes; a job that cannot fit stops, naming settings that would fit."""
    return ml_collections.ConfigDict(dict(
        enabled=True,               # False: skip the check
        # 0: the device's own memory (accelerators); a CPU has none, so there the check runs
        # only when this is set (a fake device size, e.g. in tests)
        device_memory_gib=0.0,
        fraction=0.9,               # share of the device memory the estimate may take
    ))


def mesh_config() -> ml_collections.ConfigDict:
    """The device mesh each process builds from its local devices (``jax.local_devices()``):
    ``data`` × ``model``, one of them -1 for all the devices the other leaves
    (:func:`ntk_jax.models.sharding.mesh_from_config`; a size that does not fit the local
    device count is a ``ValueError``). Models are loaded onto it (weights FSDP over ``data``,
    tensor parallel over ``model``), and features, JVP scores, hidden states, training and
    evaluation split their batches over ``data``. On one device nothing is placed."""
    return ml_collections.ConfigDict(dict(data=-1, model=1))


# Jobs whose section is still defined here (job name -> builder of ``config.<name>``), not by
# their module's ``config()``. Every other job is a plug-in: ``experiments/<name>.py`` with
# ``config()`` and ``run()``, found by :mod:`ntk_jax.launcher.discovery`.
SECTIONS = {
    "gradex": gradex_config,
    "prune_lpntk": prune_lpntk_config,
}


def sections() -> dict:
    """Every job's section builder: :data:`SECTIONS` and the plug-in experiments'
    ``config`` (:func:`ntk_jax.launcher.discovery.experiment_sections`). ValueError if a job
    has both."""
    plugins = discovery.experiment_sections()
    both = sorted(set(plugins) & set(SECTIONS))
    if both:
        raise ValueError(f"experiment(s) {both} define config() and also have a config_lib.SECTIONS entry: keep one")
    return {**SECTIONS, **plugins}


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
    c.preflight = preflight_config()
    # every job's section is always present, so any --config.<name>.<key>=... override is
    # checked against the defaults
    for name, section in sections().items():
        c[name] = section()
    return c

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


def distributed_config() -> ml_collections.ConfigDict:
    """``jax.distributed`` settings (see :mod:`ntk_jax.launcher.distributed`)."""
    return ml_collections.ConfigDict(dict(
        mode="auto",                # auto | on | off
        coordinator_address="",     # host:port of process 0 (or JAX_COORDINATOR_ADDRESS)
        num_processes=0,            # 0: from JAX_NUM_PROCESSES / the cluster
        process_id=-1,              # -1: from JAX_PROCESS_ID / the cluster
        # CPU backend's cross-process collectives: none | gloo | mpi. "none": no program spans two
        # processes (the jobs meet at coordination-service barriers), and a process's own mesh then
        # sums exactly as in a one-process run; gloo would change the last bits of every all-reduce
        cpu_collectives="none",
        # longest wait at a barrier (s); others wait there while process 0 trains the warm-up
        barrier_timeout_s=7 * 24 * 3600,
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


# Jobs whose section is defined here (job name -> builder of ``config.<name>``) rather than by
# their module's ``config()``: none now. Every job is a plug-in: ``experiments/<name>.py`` with
# ``config()`` and ``run()``, found by :mod:`ntk_jax.launcher.discovery`.
SECTIONS: dict = {}


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
    # CPU devices JAX exposes (ntk_jax.launcher.devices): 0 = JAX's own count, -1 = one per core;
    # the data mesh spans them, so batches run data-parallel over the cores
    c.cpu_devices = 0
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

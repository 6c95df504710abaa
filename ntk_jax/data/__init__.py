"""Data: the embedded synthetic corpus, tokenization, encoding and records for selection.

Modules:

* :mod:`ntk_jax.data.synthetic` — the synthetic multi-task corpus (``TASKS``,
  ``generate_task``, ``make_corpus``, JSONL helpers) the embedded default model is
  pre-trained on.
* :mod:`ntk_jax.data.tokenizer` — ``CharTokenizer``, a character tokenizer interchangeable
  with a Hugging Face one.
* :mod:`ntk_jax.data.encoding` — prompt/response (and text) records to fixed-width arrays
  with a response loss mask (``encode_examples``, ``pack_sequences``, truncation policies),
  batching helpers.
* :mod:`ntk_jax.data.records` — reading and validating records from JSONL files and local
  Hugging Face ``datasets`` directories (``read_records``, streaming ``iter_record_chunks``),
  ``encode_records`` with chat templates, length bucketing (``bucket_by_length``,
  ``encode_buckets``) and option rows for classification accuracy (``encode_options``).
* :mod:`ntk_jax.data.controlled` — the controlled selection benchmark with known useful,
  unrelated and conflicting pool families (``make_controlled_benchmark``).
* :mod:`ntk_jax.data.lexicon` — a real-word sentiment task: VADER lexicon words (human
  valence ratings, read from the installed ``vaderSentiment`` package) in sentence templates,
  splits disjoint by word, binary labels and valence regression targets (``lexicon_splits``).
"""

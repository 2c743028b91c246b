"""FID (and KID, precision/recall) without Lightning: the evaluator, its feature extractors and
the real-statistics cache.

- :mod:`~diffsweep.metrics.evaluator`: ``FIDEvaluator`` (prepare, update, compute, evaluate) and
  ``resolve_pairs``;
- :mod:`~diffsweep.metrics.extractors`: one file per extractor (``inception``, ``tiny``,
  ``classifier``), each built by ``<Extractor>.build(datamodule=, cache_dir=, **options)``;
- :mod:`~diffsweep.metrics.frechet`: the Fréchet distance and ``GaussianStats``;
- :mod:`~diffsweep.metrics.metric`: ``FrechetDistance``, the torchmetrics metric (syncs over DDP),
  and ``FeatureBank`` (the generated feature vectors, gathered over DDP);
- :mod:`~diffsweep.metrics.fidelity`: KID and precision/recall from the same features
  (torch-fidelity's implementations);
- :mod:`~diffsweep.metrics.real_stats`: real statistics, computed once and cached.

Nothing here imports Lightning; the training-time timing lives in
:mod:`diffsweep.callbacks.fid`. Import from the submodules (this package imports nothing).
"""

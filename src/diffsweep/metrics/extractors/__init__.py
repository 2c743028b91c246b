"""FID feature extractors, one per file: ``inception`` (comparable to published FID), ``tiny``
(fixed random features, smoke tests), ``classifier`` (a small CNN trained on the labels). The
contract and the factory protocol are in :mod:`diffsweep.metrics.extractors.base`. Import from
the submodules (Inception pulls in torch-fidelity; this package imports nothing)."""

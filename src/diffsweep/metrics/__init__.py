"""Metrics: FID with cached real statistics and pluggable feature extractors."""
from .features import (EXTRACTORS, INCEPTION_ENV, INCEPTION_FILENAME, INCEPTION_URL,
                       ClassifierFeatureExtractor, FeatureExtractor, InceptionFeatureExtractor,
                       InceptionWeightsError, TinyFeatureExtractor, build_feature_extractor)
from .fid import (FrechetDistance, GaussianStats, compute_stats, extract_features,
                  frechet_distance, load_or_compute_real_stats)

__all__ = [
    "EXTRACTORS", "INCEPTION_ENV", "INCEPTION_FILENAME", "INCEPTION_URL",
    "ClassifierFeatureExtractor", "FeatureExtractor", "InceptionFeatureExtractor",
    "InceptionWeightsError", "TinyFeatureExtractor", "build_feature_extractor",
    "FrechetDistance", "GaussianStats", "compute_stats", "extract_features", "frechet_distance",
    "load_or_compute_real_stats",
]

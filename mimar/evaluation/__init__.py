"""Frozen-feature evaluation: feature extraction, kNN and linear probes, result reporting."""

from mimar.evaluation.features import extract_features, pool_tokens
from mimar.evaluation.knn import knn_classify, knn_predict
from mimar.evaluation.linear import linear_probe
from mimar.evaluation.report import print_results, results_table, write_json

__all__ = [
    "extract_features",
    "knn_classify",
    "knn_predict",
    "linear_probe",
    "pool_tokens",
    "print_results",
    "results_table",
    "write_json",
]

"""Evaluation: feature extraction, kNN / linear / attentive probes, LoRA, result reporting."""

from mimar.evaluation.attentive import (
    AttentiveClassifier,
    AttentivePooler,
    attentive_params,
    attentive_probe,
)
from mimar.evaluation.config import EvalConfig
from mimar.evaluation.features import (
    causal_mask,
    extract_block_tokens,
    extract_features,
    extract_layer_features,
    pool_tokens,
)
from mimar.evaluation.knn import knn_classify, knn_predict
from mimar.evaluation.linear import linear_probe
from mimar.evaluation.lora import add_lora, lora_finetune, lora_targets, merge_lora, save_adapter
from mimar.evaluation.protocols import PROTOCOLS
from mimar.evaluation.report import print_results, results_table, write_json
from mimar.evaluation.runner import evaluate

__all__ = [
    "AttentiveClassifier",
    "AttentivePooler",
    "EvalConfig",
    "PROTOCOLS",
    "add_lora",
    "attentive_params",
    "attentive_probe",
    "causal_mask",
    "evaluate",
    "extract_block_tokens",
    "extract_features",
    "extract_layer_features",
    "knn_classify",
    "knn_predict",
    "linear_probe",
    "lora_finetune",
    "lora_targets",
    "merge_lora",
    "save_adapter",
    "pool_tokens",
    "print_results",
    "results_table",
    "write_json",
]

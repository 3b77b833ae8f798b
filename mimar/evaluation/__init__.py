"""Evaluation of a frozen backbone: feature extraction, kNN / linear / attentive probes, LoRA,
ImageNet-C-style corruptions, result reporting. Protocols that train a network (fine-tuning,
dense transfer) and the table of every protocol live above, in :mod:`mimar.protocols`."""

from mimar.evaluation.attentive import (
    AttentiveClassifier,
    AttentivePooler,
    attentive_params,
    attentive_probe,
)
from mimar.evaluation.features import (
    causal_mask,
    extract_block_tokens,
    extract_features,
    extract_layer_features,
    pool_tokens,
)
from mimar.evaluation.frozen import FROZEN, frozen_request
from mimar.evaluation.knn import knn_classify, knn_predict
from mimar.evaluation.linear import linear_probe
from mimar.evaluation.lora import add_lora, lora_finetune, lora_targets, merge_lora, save_adapter
from mimar.evaluation.options import EvalRequest
from mimar.evaluation.report import print_results, results_table, write_json
from mimar.evaluation.runner import evaluate

# The flat spelling of earlier versions, ``EvalConfig(protocols=[...], checkpoint=..., k=...)``:
# it now builds an EvalRequest of the frozen protocols (mimar.protocols.request: every one).
EvalConfig = frozen_request

__all__ = [
    "AttentiveClassifier",
    "AttentivePooler",
    "EvalConfig",
    "EvalRequest",
    "FROZEN",
    "add_lora",
    "attentive_params",
    "attentive_probe",
    "causal_mask",
    "evaluate",
    "extract_block_tokens",
    "extract_features",
    "extract_layer_features",
    "frozen_request",
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

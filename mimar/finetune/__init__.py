"""Fine-tuning: the papers' headline protocol (end-to-end, layer-wise lr decay) on the engine."""

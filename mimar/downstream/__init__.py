"""What every downstream run that trains shares (``mimar eval finetune | segment | detect``):
the recipe section (an epoch schedule, pretraining's ``train`` / ``optim`` sections, the
task's own keys) in ``config``, and the runner that trains it on the engine in ``runner``."""

"""PanFoMa training: pretraining (`pretrain`, Accelerate; sharded streaming, DDP, FSDP), the fine-tuning recipe
(`finetune`, `transformers.Trainer` via `PanFoMaTrainer`), the one optimiser policy (`optim`), the shortcut floors of
the pretraining objective, LoRA adapters and the end-to-end demo. Data loading lives in `panfoma.data`, inference in
`panfoma.inference`.
"""

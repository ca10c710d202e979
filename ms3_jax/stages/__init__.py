"""The three training stages: stage 1 (text_adapt), stage 2 (pretrain), fine-tuning (finetune)."""

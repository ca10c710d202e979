"""Evaluation and pictures: mIoU (whole / slide), the heads during pretraining, colour overlays."""

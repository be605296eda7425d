"""Evaluation as mmseg and detectron2 score it: per-image and batched inference, the
confusion-matrix metrics, and prediction to coloured PNGs."""

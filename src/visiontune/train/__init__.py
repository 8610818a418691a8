"""Training: the loop (``train``), optimiser/schedule, checkpoints."""

from visiontune.train.loop import RunResult, evaluate_loader, extract_features, predict_logits, train, train_one_epoch

__all__ = ["RunResult", "evaluate_loader", "extract_features", "predict_logits", "train", "train_one_epoch"]

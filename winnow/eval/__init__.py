"""Evaluation at any time during training: held-out accuracy (greedy and mean@k) through the oracle."""
from winnow.eval.accuracy import EvalResult, evaluate_accuracy

__all__ = ["EvalResult", "evaluate_accuracy"]

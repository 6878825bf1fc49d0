"""Evaluation of frozen representations: retrieval, weighted kNN and linear probes."""
from lcr_fast.eval.knn import knn_accuracy, knn_predict
from lcr_fast.eval.linear import linear_eval_lcr, linear_probe_cached, linear_probe_reference
from lcr_fast.eval.retrieval import retrieval_metrics

__all__ = ["retrieval_metrics", "knn_accuracy", "knn_predict", "linear_eval_lcr", "linear_probe_cached",
           "linear_probe_reference"]

"""Evaluation: accuracy, inference-time scaling, latency probe, reports."""

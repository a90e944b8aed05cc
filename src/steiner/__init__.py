"""Steiner: train language models that search inside a single context."""

__version__ = "0.1.0"

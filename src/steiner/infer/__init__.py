"""Inference: step-budget logits processors, generation, the OpenAI-compatible server."""

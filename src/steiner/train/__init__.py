"""Stages 1-3: model set-up, continual pre-training, SFT (and the shortcut baseline)."""

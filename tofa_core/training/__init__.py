"""Unified semi-supervised supernet training: config, loss, sandwich step, per-worker loop."""

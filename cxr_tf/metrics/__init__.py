"""Metrics: classification (AUROC) and localization (IoBB, IoU, IoP)."""

"""Metrics, full-ranking evaluation and the accuracy matrix."""

"""Tabular NAS benchmarks: look up what a found architecture would score."""

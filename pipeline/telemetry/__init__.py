"""Prometheus metrics on an injected registry, and their HTTP exporter."""

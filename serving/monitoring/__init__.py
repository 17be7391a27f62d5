"""Prometheus metrics and the monitoring config."""

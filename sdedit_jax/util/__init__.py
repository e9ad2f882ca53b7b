"""Plumbing: file layer, config helpers, command-line helpers, progress, logs."""

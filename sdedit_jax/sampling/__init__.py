"""Reverse-time integration: predictors, correctors and the scan-based integrator."""

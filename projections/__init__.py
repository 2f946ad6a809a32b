"""Projections: workers that follow the log and keep read models current."""

"""The CI engine-build pipeline behind `plateforme pipeline run` (pipeline.py)."""

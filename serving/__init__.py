"""Serving: client, local PredictionService, TF Serving configs."""

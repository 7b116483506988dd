"""Flower side of fedadapt's deployment-runtime benchmark (numpy only)."""

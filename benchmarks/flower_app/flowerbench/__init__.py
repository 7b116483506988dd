"""Flower side of the fedadapt overhead benchmark."""

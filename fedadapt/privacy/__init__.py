"""Privacy: client DP-SGD (opacus) with a per-client accountant and budget, central DP on the server,
secure aggregation with pairwise masks, and the config-time compatibility check.

Everything here is strategy-agnostic: strategies/private.py wraps a strategy and its recipe with these
pieces. Imports only core, models, torch, opacus and cryptography (DESIGN.md's import direction).
"""

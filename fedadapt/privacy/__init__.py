"""Privacy, one module each: client_dp (DP-SGD with opacus, a client's ledger and budget), central_dp (the
server clips, noises and accounts each round), secagg (pairwise masks), ledger (opacus' accountants), and
compat (which modes a strategy declares it supports, checked at config time).

Everything here is strategy-agnostic: strategies/private.py wraps a strategy and its recipe with these
pieces. Imports only core, models, torch, opacus and cryptography (the layers of docs/ARCHITECTURE.md).
"""

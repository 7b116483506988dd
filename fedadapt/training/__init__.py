"""Local training and evaluation loops (what a client runs between receiving a task and uploading).

Knows nothing of strategies, transports or privacy: client recipes (fedadapt.strategies) call these, and
DP-SGD (fedadapt.privacy.client_dp) replaces `train_local` with its own loop of the same signature.
"""

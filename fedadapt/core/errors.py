"""Errors a user can cause. The CLI prints them as one line, never a traceback."""


class FedadaptError(Exception):
    """Base of every error that is the user's input, not a bug in fedadapt."""


class ConfigError(FedadaptError):
    """A run configuration that cannot be used (unknown key, wrong type, bad value)."""


class DataError(FedadaptError):
    """A dataset that cannot be loaded or partitioned as asked."""


class ModelError(FedadaptError):
    """A base model that cannot be loaded, or an adapter that does not fit it."""


class PayloadError(FedadaptError):
    """Tensor bytes from a peer that are malformed, hostile, or break the payload contract."""


class AuthError(FedadaptError):
    """A peer that is not registered, is revoked, or presents the wrong credential."""

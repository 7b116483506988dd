"""Secure aggregation by pairwise masks (Bonawitz et al. style, without the dropout-recovery round).

Every client holds an X25519 key pair; its public key is known to the server (a coordinator's client
registry, or the simulator's setup). For a round, each client i and each other participant j derive a
shared seed: X25519(sk_i, pk_j) -> HKDF-SHA256 (salted with the run, info = round) -> a ChaCha20
keystream of 64-bit words. Client i uploads  enc(w_i x_i) + sum_{j > i} m_ij - sum_{j < i} m_ij  (mod 2^64),
where enc is fixed point with `frac_bits` fraction bits. Summed over all participants the masks cancel
exactly, so the server learns sum_i w_i x_i and nothing about any single x_i (each upload is uniformly
distributed to anyone without the pairwise secrets).

Dropout policy: a participant that does not upload leaves its masks in the others' uploads, so the sum
is unusable. The round's aggregate is then DISCARDED (the global state is left unchanged, the reason is
recorded) and the next round samples afresh. We do not run the recovery round of the paper (survivors
revealing seeds shared with the dropped client): against a server that lies about who dropped, that
round reveals a late client's update unless double masking is added, which is not implemented.

Arithmetic is on uint64 (numpy: well-defined wrap-around); masked tensors travel as int64 bit patterns.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedadapt.core.errors import PayloadError
from fedadapt.core.rng import derive_seed

Tensors = dict[str, torch.Tensor]
MASKED = torch.int64  # the dtype of every masked tensor on the wire


def new_key(seed: bytes | None = None) -> X25519PrivateKey:
    """A fresh key pair; from 32 seed bytes for reproducible simulations (a real client passes none)."""
    return X25519PrivateKey.generate() if seed is None else X25519PrivateKey.from_private_bytes(seed)


def public_hex(key: X25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


class Keys:
    """The keys a recipe masks with: a client daemon's own persistent key (client/state.py), or in a simulation
    one per virtual client, derived from the run seed so that runs are reproducible."""

    def __init__(self, key: X25519PrivateKey | None = None, seed: int | None = None):
        self.key, self.seed = key, seed
        self._derived: dict[str, X25519PrivateKey] = {}

    def of(self, client: str) -> X25519PrivateKey:
        if self.key is not None:
            return self.key
        if client not in self._derived:
            raw = None if self.seed is None else derive_seed(self.seed, "secagg-key", client).to_bytes(8, "little") * 4
            self._derived[client] = new_key(raw)
        return self._derived[client]

    def public(self, client: str) -> str:
        return public_hex(self.of(client))


def parse_public(text: object) -> X25519PublicKey:
    """A public key as it travels (64 hex digits); anything else raises PayloadError with one line."""
    try:
        raw = bytes.fromhex(text) if isinstance(text, str) else b""
        if len(raw) != 32:
            raise ValueError
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError:
        shown = repr(text)[:24]
        raise PayloadError(f"secure aggregation: invalid public key {shown} (expected 64 hex digits)") from None


def setup_tag(salt: str, rnd: int, peers: dict[str, str]) -> float:
    """A fingerprint of one round's masking setup (salt, round, participants and keys), sent back with each
    masked upload so the server never sums uploads masked for different setups (e.g. a result kept across a
    coordinator restart that re-ran the round with other participants): their masks would not cancel.
    48 bits, so it travels exactly as a float metric."""
    text = json.dumps([salt, rnd, sorted(peers.items())])
    return float(int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big"))


def _pair_seed(key: X25519PrivateKey, peer_hex: str, salt: bytes, rnd: int) -> bytes:
    shared = key.exchange(parse_public(peer_hex))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=f"fedadapt-secagg round {rnd}".encode()
                ).derive(shared)


def _stream(seed: bytes, words: int) -> np.ndarray:
    """`words` pseudo-random uint64 from a 32-byte seed (ChaCha20 keystream, zero nonce: one use per seed)."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * words)), dtype=np.uint64).copy()


def layout(tensors: Tensors) -> list[tuple[str, torch.Size]]:
    """The order in which tensors are flattened into one vector (sorted by name, as every party sorts)."""
    return [(k, tensors[k].shape) for k in sorted(tensors)]


def encode(tensors: Tensors, weight: float, frac_bits: int) -> np.ndarray:
    """Fixed point of weight * x, flattened in `layout` order, as uint64 (two's complement for negatives)."""
    flat = torch.cat([tensors[k].detach().double().reshape(-1) for k, _ in layout(tensors)]) * weight
    scaled = torch.round(flat * 2.0**frac_bits)
    if not torch.isfinite(scaled).all() or scaled.abs().max() >= 2.0**62:
        raise PayloadError("secure aggregation: a value is too large for the fixed-point encoding "
                           "(lower privacy.secagg_frac_bits)")
    return scaled.to(torch.int64).numpy().view(np.uint64)


def decode(total: np.ndarray, shapes: list[tuple[str, torch.Size]], frac_bits: int, dtype: torch.dtype) -> Tensors:
    """The inverse of `encode` for a sum: signed value / 2^frac_bits, split back into named tensors."""
    flat = torch.from_numpy(total.view(np.int64).astype(np.float64)) / 2.0**frac_bits
    out, pos = {}, 0
    for name, shape in shapes:
        size = math.prod(shape)
        out[name] = flat[pos : pos + size].reshape(shape).to(dtype)
        pos += size
    return out


def mask(tensors: Tensors, weight: float, *, me: str, key: X25519PrivateKey, peers: dict[str, str], rnd: int,
         salt: bytes, frac_bits: int) -> Tensors:
    """What client `me` uploads: its encoded, pairwise-masked update, as int64 tensors of the same names."""
    vec = encode(tensors, weight, frac_bits)
    for other, pk in sorted(peers.items()):
        if other == me:
            continue
        m = _stream(_pair_seed(key, pk, salt, rnd), vec.size)
        vec = vec + m if me < other else vec - m  # uint64: wraps mod 2^64
    out, pos = {}, 0
    signed = torch.from_numpy(vec.view(np.int64).copy())
    for name, shape in layout(tensors):
        size = math.prod(shape)
        out[name] = signed[pos : pos + size].reshape(shape)
        pos += size
    return out


def unmask_sum(uploads: list[Tensors], frac_bits: int, dtype: torch.dtype = torch.float32) -> Tensors:
    """sum_i w_i x_i from the masked uploads of ALL participants (the masks cancel only then)."""
    shapes = layout(uploads[0])
    total = np.zeros(sum(math.prod(s) for _, s in shapes), dtype=np.uint64)
    for up in uploads:
        if layout(up) != shapes:
            raise PayloadError("secure aggregation: masked uploads do not have the same tensors")
        total += torch.cat([up[k].reshape(-1) for k, _ in shapes]).numpy().view(np.uint64)
    return decode(total, shapes, frac_bits, dtype)

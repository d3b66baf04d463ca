"""Secure aggregation of the sites' validation statistics: SecAgg+ on Flower's primitives, beside
fedfreeze's own round (``federation.secure-aggregation``; the rules are ``federation/secure_stats.py``).

Why not Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod`` (flwr 1.42.0, read from its source):

- the workflow runs only inside the legacy ``DefaultWorkflow``: ``__call__`` refuses any context but a
  ``LegacyContext``, and its stages call a legacy ``Strategy.configure_fit`` / ``aggregate_fit`` on
  ``ClientProxy`` objects. fedfreeze's round loop is its own, on the Message API (``flower/federate.py``:
  partial exchange, reply checks, failure records, resumable checkpoints), with Message-API strategies;
- what it sums is the fit result's *model parameters*: floats clipped to ``clipping_range``,
  stochastically rounded, multiplied by the site's ``num_examples`` and averaged back. The sum of
  integer histograms would come out clipped and rounded, not exact; and the mod masks and then
  *clears every array record* of the reply, while fedfreeze's trained arrays must reach the coordinator
  in clear (its reply checks and Flower's robust and DP strategies need each site's update);
- the mod acts on ``train`` messages only, so the final evaluation (an ``evaluate`` message) could
  not use it; and it sums over every sampled node, while the training sites and the evaluation-only
  sites must be summed apart;
- its unmask stage asks for shares of every *sampled* node, so a node that dropped before the key
  exchange (and so left no shares) makes it abort ("Not enough shares"), where SecAgg+ leaves such a
  node out of the sum.

So fedfreeze runs the same four stages itself, with the same primitives (``flwr.supercore.primitives
.asymmetric`` key pairs, ``flwr.common.secure_aggregation.crypto``'s ECDH + HKDF shared keys, Fernet
encryption and Shamir secret sharing, ``secaggplus_utils``' share packing), as ``secagg_server.py``
(the coordinator) and ``secagg_site.py`` (a site):

1. **setup** (a ``query`` message): each site makes two key pairs and returns the public keys, and
   its name (the coordinator groups the sites by role: training, evaluation-only);
2. **share keys** (``query``): the coordinator sends each site its group's public keys and the
   reconstruction threshold (a strict majority of the group); the site draws a mask seed, splits it
   and its first private key into Shamir shares, and returns them encrypted for each other site;
3. **mask** (the round's own ``train`` or ``evaluate`` message carries the shares meant for the
   site): the site adds to its exact statistics its own mask and a pairwise mask per other site
   (plus for the lower node id, minus for the higher), modulo 2^32, and replies with the masked
   vector beside its usual reply;
4. **unmask** (``query``): each site whose masked vector was accepted gets the lists of surviving and
   dropped sites, and returns its shares of the survivors' mask seeds and of the dropped sites'
   private keys (never both for one site, and only once a session); the coordinator rebuilds them,
   removes the masks, and keeps the sum.

Threat model: Flower's, SecAgg+'s semi-honest one: a coordinator that follows the protocol but
reads everything it receives learns only the sum over the sites that survived masking, as long as
fewer than the threshold of sites collude with it. There is no signature round against a coordinator
that lies about the public keys it relays or tells sites different survivor lists (SecAgg+'s
malicious-server variant): the keys travel over the SuperLink's TLS, and each site authenticates to
it (SuperNode authentication), but the sites do not authenticate each other's keys. SecAgg+ protects
confidentiality, not integrity: a site can add anything it likes to the sum
(``secure_stats.check_sum`` catches a sum whose cases do not add up to the sites' ``val-n``).

One change from Flower: the masks are drawn from ChaCha20 keyed by SHA-256 of the full 256-bit seed
(the SecAgg paper's PRG), not from ``secaggplus_utils.pseudo_rand_gen``, which folds the seed to 32
bits for NumPy's ``RandomState``: with two sites in a group, a coordinator could then search the 2^32
seeds of their pairwise mask.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

from fedfreeze.federation.secure_stats import MODULUS

# message types of the stages that travel on their own (the mask stage rides on the round's message)
SETUP_TYPE = "query.secagg_setup"
SHARE_KEYS_TYPE = "query.secagg_share_keys"
UNMASK_TYPE = "query.secagg_unmask"

# stages, in order; a site refuses a stage out of order within a session
SETUP, SHARE_KEYS, MASK, UNMASK = "setup", "share-keys", "mask", "unmask"
STAGES = (SETUP, SHARE_KEYS, MASK, UNMASK)

STATE = "fedfreeze-secagg"  # ConfigRecord in the site's Context.state (kept by its SuperNode between messages)


def mask_stream(seed: bytes, length: int) -> NDArray[np.uint64]:
    """``length`` pseudo-random values in [0, 2^32) from ``seed``: ChaCha20 keyed by SHA-256 of the seed."""
    key = hashlib.sha256(b"fedfreeze secagg mask|" + seed).digest()
    cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = cipher.update(bytes(4 * length)) + cipher.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint64)


def pairwise_sign(own: int, other: int) -> int:
    """How ``own`` applies the mask it shares with ``other``: added by the higher node id, taken away
    by the lower, so each pair's masks cancel in the sum (Flower's convention)."""
    return 1 if own > other else -1


def add_mod(vector: NDArray[np.uint64], mask: NDArray[np.uint64], sign: int) -> NDArray[np.uint64]:
    """``vector + sign * mask`` modulo 2^32."""
    if sign > 0:
        return (vector + mask) % MODULUS
    return (vector + MODULUS - mask) % MODULUS


def to_wire(vector: NDArray[np.uint64]) -> bytes:
    return np.asarray(vector, dtype="<u4").tobytes()


def from_wire(data: bytes, length: int) -> NDArray[np.uint64]:
    """A masked vector as sent; a ``ValueError`` unless it holds ``length`` values."""
    if len(data) != 4 * length:
        raise ValueError(f"masked statistics of {len(data)} bytes, expected {4 * length}")
    return np.frombuffer(data, dtype="<u4").astype(np.uint64)

"""A site's part of secure aggregation (SecAgg+ on Flower's primitives; ``secagg.py`` says why and how).

The site's secrets (its private keys, its mask seed, the shares other sites sent it) live in its
``Context.state``, which its SuperNode keeps between messages of a run and never sends anywhere.
Each stage checks that it follows the previous one of the same session (the round, or the final
evaluation), so a stale or replayed message is refused, and the unmask stage answers once.
"""

from __future__ import annotations

import os
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedfreeze.errors import ProtocolError
from fedfreeze.federation.secure_stats import MODULUS
from fedfreeze.flower.secagg import MASK, SETUP, SHARE_KEYS, STATE, UNMASK, add_mod, mask_stream, pairwise_sign, to_wire


def _state(context: Context, stage: str, session: str) -> dict[str, Any]:
    """The site's secure-aggregation state, which must stand at ``stage`` of ``session``."""
    record = context.state.config_records.get(STATE)
    state = dict(record) if record is not None else {}
    if state.get("session") != session or state.get("stage") != stage:
        raise ProtocolError(
            f"secure aggregation: expected stage {stage!r} of {session!r} to come before this one, but this "
            f"site stands at {state.get('stage')!r} of {state.get('session')!r}"
        )
    return state


def _save(context: Context, state: dict[str, Any]) -> None:
    context.state.config_records[STATE] = ConfigRecord(state)


def setup(config: ConfigRecord, context: Context, node: int, site: str) -> ConfigRecord:
    """Stage 1: fresh key pairs for this session (one for the pairwise masks, one to encrypt shares)."""
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state: dict[str, Any] = {
        "session": str(config["session"]),
        "stage": SETUP,
        "node": node,
        "sk1": private_key_to_bytes(sk1),
        "pk1": public_key_to_bytes(pk1),
        "sk2": private_key_to_bytes(sk2),
        "pk2": public_key_to_bytes(pk2),
    }
    _save(context, state)
    return ConfigRecord({"stage": SETUP, "pk1": state["pk1"], "pk2": state["pk2"], "site": site})


def share_keys(config: ConfigRecord, context: Context) -> ConfigRecord:
    """Stage 2: check the group's public keys, draw the mask seed, and send each other site its
    Shamir shares of the seed and of this site's first private key, encrypted for it alone."""
    state = _state(context, SETUP, str(config["session"]))
    own = int(state["node"])
    nodes = [int(n) for n in cast(list[int], config["nodes"])]
    pk1s, pk2s = cast(list[bytes], config["pk1"]), cast(list[bytes], config["pk2"])
    threshold = int(cast(int, config["threshold"]))
    if not len(nodes) == len(pk1s) == len(pk2s) or len(set(nodes)) != len(nodes):
        raise ProtocolError("secure aggregation: the group's node ids and public keys do not line up")
    if own not in nodes or pk1s[nodes.index(own)] != state["pk1"] or pk2s[nodes.index(own)] != state["pk2"]:
        raise ProtocolError("secure aggregation: this site's public keys are missing or altered in its group's list")
    if len(set(pk1s) | set(pk2s)) != 2 * len(nodes):
        raise ProtocolError("secure aggregation: two public keys of the group are identical")
    if not 2 <= threshold <= len(nodes):
        raise ProtocolError(f"secure aggregation: threshold {threshold} for a group of {len(nodes)}")
    seed = os.urandom(32)
    seed_shares = create_shares(seed, threshold, len(nodes))
    key_shares = create_shares(cast(bytes, state["sk1"]), threshold, len(nodes))
    sk2 = bytes_to_private_key(cast(bytes, state["sk2"]))
    dsts, ciphertexts = [], []
    for i, node in enumerate(nodes):
        if node == own:
            continue
        key = generate_shared_key(sk2, bytes_to_public_key(pk2s[i]))
        ciphertexts.append(encrypt(key, share_keys_plaintext_concat(own, node, seed_shares[i], key_shares[i])))
        dsts.append(node)
    mine = nodes.index(own)
    state.update(
        stage=SHARE_KEYS,
        group=str(config["group"]),
        threshold=threshold,
        nodes=nodes,
        pk1s=pk1s,
        pk2s=pk2s,
        seed=seed,
        holders=[own],  # whose shares this site holds, aligned with the two lists below
        seed_shares=[seed_shares[mine]],
        key_shares=[key_shares[mine]],
    )
    _save(context, state)
    return ConfigRecord({"stage": SHARE_KEYS, "dsts": dsts, "ctxts": ciphertexts})


def mask(config: ConfigRecord, context: Context, vector: np.ndarray) -> ConfigRecord:
    """Stage 3 (with the round's message): keep the shares other sites sent, and mask ``vector``, the
    site's exact statistics, with its own mask and one pairwise mask per site that shared keys."""
    state = _state(context, SHARE_KEYS, str(config["session"]))
    own = int(state["node"])
    nodes = [int(n) for n in cast(list[int], state["nodes"])]
    pk1s, pk2s = cast(list[bytes], state["pk1s"]), cast(list[bytes], state["pk2s"])
    sources = [int(n) for n in cast(list[int], config["srcs"])]
    ciphertexts = cast(list[bytes], config["ctxts"])
    if len(sources) != len(ciphertexts) or len(set(sources)) != len(sources) or not set(sources) <= set(nodes) - {own}:
        raise ProtocolError("secure aggregation: the forwarded shares do not come from the site's group")
    if len(sources) + 1 < int(state["threshold"]):
        raise ProtocolError(
            f"secure aggregation: shares from {len(sources)} other sites, fewer than the threshold needs"
        )
    sk2 = bytes_to_private_key(cast(bytes, state["sk2"]))
    holders = list(cast(list[int], state["holders"]))
    seed_shares, key_shares = (
        list(cast(list[bytes], state["seed_shares"])),
        list(cast(list[bytes], state["key_shares"])),
    )
    for src, ciphertext in zip(sources, ciphertexts, strict=True):
        key = generate_shared_key(sk2, bytes_to_public_key(pk2s[nodes.index(src)]))
        actual, dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
        if actual != src or dst != own:
            raise ProtocolError(f"secure aggregation: shares from node {actual} for node {dst} arrived as {src}'s")
        holders.append(src)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    values = np.asarray(vector, dtype=np.int64)
    if (values < 0).any() or (values >= MODULUS // 2).any():
        raise ProtocolError("secure aggregation: the statistics hold counts outside [0, 2^31)")
    masked = add_mod(values.astype(np.uint64), mask_stream(cast(bytes, state["seed"]), len(values)), 1)
    sk1 = bytes_to_private_key(cast(bytes, state["sk1"]))
    for src in sources:
        shared = generate_shared_key(sk1, bytes_to_public_key(pk1s[nodes.index(src)]))
        masked = add_mod(masked, mask_stream(shared, len(values)), pairwise_sign(own, src))
    state.update(stage=MASK, holders=holders, seed_shares=seed_shares, key_shares=key_shares)
    _save(context, state)
    return ConfigRecord({"stage": MASK, "masked": to_wire(masked)})


def unmask(config: ConfigRecord, context: Context) -> ConfigRecord:
    """Stage 4: the shares of the survivors' mask seeds and of the dropped sites' private keys; never
    both for one site, never for a site this site did not hear from, and only once per session."""
    state = _state(context, MASK, str(config["session"]))
    active = [int(n) for n in cast(list[int], config["active"])]
    dead = [int(n) for n in cast(list[int], config["dead"])]
    holders = [int(n) for n in cast(list[int], state["holders"])]
    if set(active) & set(dead):
        raise ProtocolError("secure aggregation: a site is listed both as surviving and as dropped")
    if len(active) < int(state["threshold"]):
        raise ProtocolError(f"secure aggregation: {len(active)} surviving sites, fewer than the threshold")
    unknown = sorted(set(active + dead) - set(holders))
    if unknown:
        raise ProtocolError(f"secure aggregation: asked for the shares of nodes {unknown}, which sent none")
    seed_shares, key_shares = cast(list[bytes], state["seed_shares"]), cast(list[bytes], state["key_shares"])
    shares = [seed_shares[holders.index(n)] for n in active] + [key_shares[holders.index(n)] for n in dead]
    state.update(stage=UNMASK)
    _save(context, state)
    return ConfigRecord({"stage": UNMASK, "nids": active + dead, "shares": shares})

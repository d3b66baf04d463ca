"""A site key's fingerprint, as the people at both ends read it to each other.

The docs have a site read ``ssh-keygen -lf SITE.pub`` to the coordinator by phone; the coordinator
holds the key as Flower stores it (PEM). Both give the same ``SHA256:...`` here: the SHA-256 of the
key's OpenSSH encoding, in base64 without padding.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives import serialization


def fingerprint(public_key: bytes) -> str:
    """``SHA256:...`` of a public key given as PEM or as an OpenSSH line (``ecdsa-sha2-nistp384 AAAA... name``)."""
    text = public_key.strip()
    if text.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(text)
        text = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(text.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

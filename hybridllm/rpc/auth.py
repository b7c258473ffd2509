"""hybridllm's optional token handshake, carried in HELLO's 24-byte `conn_caps` (protocol/README.md §9).

llama.cpp peers send and answer 24 zero bytes there (no RDMA), so they never see any of this:

    client -> HELLO  caps = CLIENT_MAGIC | client nonce (16)
    worker -> 8.0.0  caps = CHALLENGE_MAGIC | worker nonce (16)
    client -> HELLO  caps = HMAC(token, "client" | nonces)[:24]
    worker -> 8.0.0  caps = HMAC(token, "worker" | nonces)[:24]

Both sides prove they know the token without sending it; fresh nonces on both sides make a recorded
handshake useless for a new connection. A worker with a token closes any connection that does not open
this way; a client with a token refuses a worker that does not challenge it.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from .messages import CONN_CAPS_SIZE

CLIENT_MAGIC = b"HLLMTOK1"
CHALLENGE_MAGIC = b"HLLMCHL1"
NONCE_SIZE = CONN_CAPS_SIZE - len(CLIENT_MAGIC)   # 16
_LABEL = b"hybridllm-rpc-auth-v1|"


def token_bytes(token: str | bytes) -> bytes:
    key = token.encode("utf-8") if isinstance(token, str) else bytes(token)
    if not key:
        raise ValueError("an RPC token must not be empty")
    return key


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def hello_caps(nonce: bytes) -> bytes:
    """The client's first conn_caps."""
    return CLIENT_MAGIC + nonce


def challenge_caps(nonce: bytes) -> bytes:
    """The worker's conn_caps answering a client that asked to authenticate."""
    return CHALLENGE_MAGIC + nonce


def _nonce_after(caps: bytes, magic: bytes) -> bytes | None:
    caps = bytes(caps)
    if len(caps) != CONN_CAPS_SIZE or not hmac.compare_digest(caps[:len(magic)], magic):
        return None
    return caps[len(magic):]


def client_nonce(caps: bytes) -> bytes | None:
    """The nonce in a client's first HELLO, or None when it did not ask to authenticate (zero caps)."""
    return _nonce_after(caps, CLIENT_MAGIC)


def worker_nonce(caps: bytes) -> bytes | None:
    """The nonce in the worker's HELLO answer, or None when the worker did not challenge."""
    return _nonce_after(caps, CHALLENGE_MAGIC)


def proof(key: bytes, role: bytes, client: bytes, worker: bytes) -> bytes:
    """HMAC-SHA256 over both nonces, bound to who is proving (b"client" or b"worker"), cut to 24 bytes."""
    return hmac.new(key, _LABEL + role + b"|" + client + worker, hashlib.sha256).digest()[:CONN_CAPS_SIZE]


def check(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, bytes(got))

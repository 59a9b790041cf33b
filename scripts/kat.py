#!/usr/bin/env python3
"""Independent implementation of coffer's format v1 (docs/FORMAT.md) for the known-answer
test: it writes tests/golden/kat-v1.hex from fixed inputs with the `cryptography` package,
so the Rust implementation is checked against a second one rather than against itself.
Needs `pip install cryptography` (>= 42)."""
import sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives import hashes, hmac

def hkdf_expand(prk, info, n=32):
    return HKDFExpand(hashes.SHA256(), n, info).derive(prk)

def hkdf_extract(salt, ikm):
    h = hmac.HMAC(salt, hashes.SHA256()); h.update(ikm); return h.finalize()

def encrypt(dk, file_id, shift, plaintext):
    prefix = b"COFR" + bytes([1, 1, shift, 0])
    prk = hkdf_extract(file_id, dk)
    content = hkdf_expand(prk, b"coffer v1 content key" + prefix)
    commit = hkdf_expand(prk, b"coffer v1 key commitment" + prefix)
    header = prefix + file_id + commit
    c = 1 << shift
    chunks = [plaintext[i:i + c] for i in range(0, len(plaintext), c)] or [b""]
    out = header
    for i, p in enumerate(chunks):
        nonce = i.to_bytes(8, "big") + b"\0\0\0" + bytes([1 if i == len(chunks) - 1 else 0])
        out += AESGCMSIV(content).encrypt(nonce, p, header)
    return out

if __name__ == "__main__":
    obj = encrypt(bytes([0x11] * 32), bytes([0x22] * 16), 12, b"coffer known answer")
    sys.stdout.write(obj.hex() + "\n")

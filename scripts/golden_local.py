#!/usr/bin/env python3
"""Independent implementation of the local store's version files (docs/DESIGN.md, "The local
N-replica store"): writes the golden files tests/golden/local-*.{m,d} that the record tests
read, so the Rust reader is checked against a second writer rather than against itself, and
every later version of coffer must still read them. Needs `pip install blake3 crc32c`."""
import json, struct, sys
import blake3, crc32c

BLOCK = 64 * 1024

def record(magic, rec):
    # Compact JSON in the field order of MetaRecord, as serde_json writes it.
    body = json.dumps(rec, separators=(",", ":")).encode()
    head = magic + struct.pack("<I", len(body)) + body
    return head + struct.pack("<I", crc32c.crc32c(head))

def stored(data):
    # The bytes, then one CRC32C per block of BLOCK bytes.
    table = b"".join(struct.pack("<I", crc32c.crc32c(data[i:i + BLOCK]))
                     for i in range(0, len(data), BLOCK))
    return data + table

def live(key, data, meta):
    digest = blake3.blake3(data).hexdigest()
    return {"key": key, "deleted": False, "size": len(data), "block_size": BLOCK,
            "blake3": digest, "etag": digest[:32], "mtime_ns": 1_765_000_000_123_456_789,
            "metadata": meta}

out = sys.argv[1] if len(sys.argv) > 1 else "tests/golden"
# A version with its own data file (every version before embedding, and large ones since).
big = bytes((i * 2654435761 >> 13) & 0xff for i in range(70_000))
with open(f"{out}/local-record.m", "wb") as f:
    f.write(record(b"CFRM", live("docs/big.bin", big, {"coffer-mode": "33188"})))
with open(f"{out}/local-record.d", "wb") as f:
    f.write(stored(big))
# A small version with its data embedded after the record.
small = b"hello, coffer\n"
with open(f"{out}/local-embedded.m", "wb") as f:
    f.write(record(b"CFRE", live("docs/small.txt", small, {"coffer-mode": "33152"}))
            + stored(small))
# A delete marker.
with open(f"{out}/local-marker.x", "wb") as f:
    f.write(record(b"CFRM", {"key": "docs/gone", "deleted": True, "size": 0,
                             "block_size": BLOCK, "blake3": "", "etag": "",
                             "mtime_ns": 1_765_000_000_223_456_789, "metadata": {}}))

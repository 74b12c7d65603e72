"""Cut a checkpoint file into parts small enough to travel to the device machine one call at a time, and join them
back there, bit for bit. Standard library only: it runs under the device image's python3 before anything is
installed.

The 85 MB DINOv2 ``model.safetensors`` does not fit in one call (64 MiB, working tree included), and plain
compression saves 7 %. Its bytes are little-endian float32, so the packed stream stores the file as four byte
planes (byte 0, 1, 2 and 3 of every 4-byte word): planes 0-2 (mantissa bits: noise) as they are, plane 3 (sign and
seven exponent bits) xz-compressed, about 2.7 times smaller. The stream, about 71 MiB for DINOv2-S, is then cut
into parts; the manifest records the sha256 of every part and of the original file, and joining checks both.

    python benchmarks/device/checkpoint_parts.py pack model.safetensors .dev/ckpt --balance-against 15000000
    python benchmarks/device/checkpoint_parts.py unpack .dev/ckpt.manifest.json DIR [DIR ...] --out model.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import sys
from pathlib import Path

FORMAT = "byte-planes-v1"  # planes 0-2 raw, the tail (len % 4 bytes) raw, then plane 3 xz-compressed


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def packed_stream(data: bytes) -> tuple[bytes, int]:
    """``(stream, xz_bytes)``: ``data`` as byte planes 0-2, its tail, then plane 3 compressed (``xz_bytes`` long)."""
    words = len(data) // 4 * 4
    planes = [data[i:words:4] for i in range(4)]
    compressed = lzma.compress(planes[3], preset=9)
    return b"".join([*planes[:3], data[words:], compressed]), len(compressed)


def original_bytes(stream: bytes, size: int) -> bytes:
    """The inverse of :func:`packed_stream` for an original of ``size`` bytes."""
    n = size // 4
    out = bytearray(size)
    for i in range(3):
        out[i:4 * n:4] = stream[i * n:(i + 1) * n]
    tail = size - 4 * n
    out[4 * n:] = stream[3 * n:3 * n + tail]
    out[3:4 * n:4] = lzma.decompress(stream[3 * n + tail:])
    return bytes(out)


def cut_points(length: int, balance_against: int) -> list[int]:
    """Where to cut a stream of ``length`` bytes into two parts so that part 1 plus ``balance_against`` bytes (what
    travels beside it) equals part 2."""
    return [min(max((length - balance_against) // 2, 0), length)]


def pack(source: Path, prefix: Path, balance_against: int) -> dict:
    """Write ``<prefix>.1``, ``<prefix>.2`` and ``<prefix>.manifest.json``; return the manifest."""
    data = source.read_bytes()
    stream, xz_bytes = packed_stream(data)
    if original_bytes(stream, len(data)) != data:  # never ship a stream that does not round-trip
        raise RuntimeError(f"packing {source} does not round-trip; nothing written")
    bounds = [0, *cut_points(len(stream), balance_against), len(stream)]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, (start, end) in enumerate(zip(bounds, bounds[1:]), 1):
        chunk = stream[start:end]
        path = prefix.with_name(f"{prefix.name}.{k}")
        path.write_bytes(chunk)
        parts.append({"name": path.name, "bytes": len(chunk), "sha256": sha256(chunk)})
    manifest = {"format": FORMAT, "file": source.name, "bytes": len(data), "sha256": sha256(data),
                "plane3_xz_bytes": xz_bytes, "stream_bytes": len(stream), "parts": parts}
    prefix.with_name(f"{prefix.name}.manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack(manifest_path: Path, folders: list[Path], out: Path) -> dict:
    """Join the parts named in the manifest (each looked for in ``folders``, in order), check them and the result,
    and write ``out`` atomically. Raises ``SystemExit`` with what is missing or damaged."""
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise SystemExit(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    chunks = []
    for part in manifest["parts"]:
        found = [f / part["name"] for f in folders if (f / part["name"]).is_file()]
        if not found:
            raise SystemExit(f"part {part['name']} is in none of {', '.join(map(str, folders))}: carry it (or, on "
                             "the device, run the call that stores it again)")
        chunk = found[0].read_bytes()
        if len(chunk) != part["bytes"] or sha256(chunk) != part["sha256"]:
            raise SystemExit(f"{found[0]} is damaged ({len(chunk)} bytes, sha256 differs from the manifest): "
                             "pack it again")
        chunks.append(chunk)
    data = original_bytes(b"".join(chunks), manifest["bytes"])
    if sha256(data) != manifest["sha256"]:
        raise SystemExit(f"the joined {manifest['file']} has the wrong sha256: pack it again")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + f".partial{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(out)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("pack", help="cut FILE into PREFIX.1, PREFIX.2 and PREFIX.manifest.json")
    p.add_argument("file", type=Path)
    p.add_argument("prefix", type=Path)
    p.add_argument("--balance-against", type=int, default=0,
                   help="bytes that travel beside part 1: the cut makes both calls carry the same")
    u = verbs.add_parser("unpack", help="join the parts of MANIFEST found in DIRs into --out, checked")
    u.add_argument("manifest", type=Path)
    u.add_argument("dirs", nargs="+", type=Path)
    u.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        m = pack(args.file, args.prefix, args.balance_against)
        print(f"{args.file} ({m['bytes']:,} B, sha256 {m['sha256'][:16]}…) -> {m['stream_bytes']:,} B in parts "
              + ", ".join(f"{p['name']} {p['bytes']:,} B" for p in m["parts"]))
    else:
        m = unpack(args.manifest, args.dirs, args.out)
        print(f"{args.out}: {m['bytes']:,} B, sha256 {m['sha256']} (checked)")


if __name__ == "__main__":
    sys.exit(main())

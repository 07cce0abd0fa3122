"""Exact and near duplicates by perceptual hash.

``imagehash.phash`` with ``hash_size=16`` (the signs of the 16x16 lowest frequencies of a 64x64 grayscale
image's DCT against their median) gives 256 bits that change little under resizing and re-compression. It
replaced the difference hash (``dhash``, signs of neighbouring pixels' differences), whose bits in flat regions
flip with resampling noise, and which sees mostly the outline of an object on a plain background: on
scikit-image's photos, dhash kept resized copies up to 17 bits apart, and it put different Fashion-MNIST
trousers within 10 bits of each other (pixels 6-12 grey levels apart on average); phash keeps the copies within
12 bits and the nearest two of 3,000 Fashion-MNIST training images 30 bits apart.
Pairs within a Hamming radius are found with faiss's multi-index hashing (``IndexBinaryMultiHash``): the 256 bits
are cut into ``radius + 1`` substrings, and by pigeonhole two hashes within ``radius`` bits agree exactly on at
least one substring, so a query only compares against the codes sharing one of its substrings (hash-table
lookups) instead of against every code. That keeps the search near linear in the number of images where a
brute-force scan is O(n^2); the result is exact (the same pairs as brute force, checked in the tests).
"""

from __future__ import annotations

import numpy as np

HASH_SIZE = 16
HASH_BITS = HASH_SIZE * HASH_SIZE
HASH_BYTES = HASH_BITS // 8
# JPEGs are decoded through ``draft`` at the coarsest DCT scale (1/1 to 1/8) that keeps at least this many pixels
# a side: 16 times the hash grid, whatever the file's own size. An image and its resized copy then both reach
# the hash's Lanczos reduction from well above its 64x64 input, within a factor of two of each other. Drafting
# near the grid instead (64 px) decoded an image and its half-size copy at different DCT scales, and their
# hashes drifted apart (dhash: up to 26 bits on scikit-image's photos and their 1/2, 1/3, 2x, quality-55 and
# PNG copies, where a full decode kept them within 15); at 256 px the hash is a full decode's within 2 bits, at
# about a third of its decode time for photos of 300 to 3,000 px.
DECODE_SIZE = 256


def image_hash(image) -> bytes:
    """The 256-bit perceptual hash of a PIL image, as 32 bytes."""
    import imagehash

    bits = imagehash.phash(image, hash_size=HASH_SIZE).hash.reshape(-1)
    return np.packbits(bits).tobytes()


def file_hash(image) -> bytes:
    """:func:`image_hash` of an opened, not yet loaded, image file: decoded at :data:`DECODE_SIZE`, upright."""
    from PIL import ImageOps

    image.draft("L", (DECODE_SIZE, DECODE_SIZE))
    return image_hash(ImageOps.exif_transpose(image))


def near_pairs(hashes: np.ndarray, radius: int) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` for every pair ``i < j`` of ``hashes`` (``(n, 32)`` uint8) within ``radius`` bits."""
    import faiss

    n = len(hashes)
    if n < 2:
        return []
    hashes = np.ascontiguousarray(hashes, dtype=np.uint8)
    if not 0 <= radius < 64:
        raise ValueError(f"Hamming radius {radius} is out of range for {HASH_BITS}-bit hashes (0 to 63)")
    # At least radius + 1 substrings (the pigeonhole), and at least 4: faiss keys a substring by at most 64 bits.
    substrings = max(radius + 1, HASH_BITS // 64)
    bits = HASH_BITS // substrings
    index = faiss.IndexBinaryMultiHash(HASH_BITS, substrings, bits)
    index.add(hashes)
    pairs = []
    # Queries in blocks keep the result arrays small however large the collection.
    for start in range(0, n, 65536):
        limits, distances, ids = index.range_search(hashes[start : start + 65536], radius + 1)  # strict: < r + 1
        for q in range(len(limits) - 1):
            i = start + q
            for d, j in zip(distances[limits[q] : limits[q + 1]], ids[limits[q] : limits[q + 1]], strict=True):
                if j > i:
                    pairs.append((i, int(j), int(d)))
    return pairs


class UnionFind:
    """Disjoint sets over ``0..n-1`` (path halving, union by size)."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.size[a] < self.size[b]:
                a, b = b, a
            self.parent[b] = a
            self.size[a] += self.size[b]

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return out


def duplicate_groups(hashes: np.ndarray, radius: int) -> list[list[int]]:
    """Groups (each of 2 or more indices, sorted) of images linked by chains of near-duplicate pairs."""
    uf = UnionFind(len(hashes))
    for i, j, _ in near_pairs(hashes, radius):
        uf.union(i, j)
    return sorted(sorted(g) for g in uf.groups().values() if len(g) > 1)

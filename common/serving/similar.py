"""Similar-image search in the server: the index folder written by ``convnets embed`` (read with its own
``load_index``), refused unless it was built by the served checkpoint at the served image size, and the network
that embeds a query exactly as ``embed`` embedded the collection (the trained model with its head replaced by
Identity, L2-normalised output; the server's ImageDecoder gives the same preprocessing as ``embed``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.errors import UserError
from common.serving.metadata import ModelMetadata

if TYPE_CHECKING:
    import torch

log = logging.getLogger("convnets")

DEFAULT_K = 10  # neighbours per image when a request names no k, as `convnets similar -k`


class EmbeddingRuntime:
    """A callable float32 NCHW batch (normalised, as ImageDecoder gives it) -> L2-normalised embeddings."""

    def __init__(self, model: torch.nn.Module, device: torch.device, channels_last: bool):
        import torch  # here, not at the top: the ONNX server (app.py imports this module) runs without torch

        self.model, self.device = model, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from common.owndata.embed import embed_normalized

        x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=self.memory_format)
        return embed_normalized(self.model, x)


class SimilarIndex:
    """The faiss index and its paths, searched with embeddings from ``self.embed``."""

    def __init__(self, folder: Path, index, paths: list[str], meta: dict, embed: EmbeddingRuntime):
        self.folder, self.index, self.paths, self.meta, self.embed = folder, index, paths, meta, embed

    def __len__(self) -> int:
        return len(self.paths)

    def search(self, vectors: np.ndarray, k: int) -> list[list[dict]]:
        """For each row of ``vectors``, its ``k`` nearest indexed images, best first: path, cosine similarity
        (``score``, as ``convnets similar`` prints it) and cosine distance (``1 - score``)."""
        from common.owndata.embed import nearest

        # float32 rounding can put a score a hair above 1.
        return [
            [{"path": path, "score": score, "distance": max(0.0, 1.0 - score)} for path, score in row]
            for row in nearest(self.index, self.paths, vectors, k)
        ]

    def describe(self) -> dict:
        """What model metadata says about the search."""
        return {
            "index": str(self.folder),
            "count": len(self),
            "dim": self.index.d,
            "index_type": self.meta.get("index"),
        }


def mismatches(meta: dict, served: ModelMetadata, checkpoint: str) -> list[str]:
    """How the network an index was built with differs from the served one (empty when it is the same)."""
    from common.checkpoint import checkpoint_sha256

    problems = []
    if meta.get("arch") != served.arch:
        problems.append(f"it holds {meta.get('arch')} embeddings, the server serves {served.arch}")
    for key, what in (("image_size", "image size"), ("resize_size", "resize size")):
        recorded, value = meta.get(key), getattr(served, key)
        if recorded is not None and recorded != value:
            problems.append(f"it was built at {what} {recorded}, the server's checkpoint evaluates at {value}")
    if meta.get("checkpoint_sha256"):
        if meta["checkpoint_sha256"] != checkpoint_sha256(checkpoint):
            problems.append(f"it was built with {meta.get('checkpoint')} (sha256 {meta['checkpoint_sha256'][:12]}), "
                            f"not with the served {checkpoint}")  # fmt: skip
    elif os.path.abspath(checkpoint) != meta.get("checkpoint"):
        problems.append(f"it was built with {meta.get('checkpoint')}, not with the served {checkpoint}")
    return problems


def load_similar(folder: str, checkpoint: str, served: ModelMetadata, device: str) -> SimilarIndex:
    """The index of ``folder`` and the network to embed queries with; a UserError naming ``folder`` and the
    difference when the index was built by another network than the served ``checkpoint``."""
    from common.distributed import resolve_device
    from common.inference import load_trained
    from common.owndata import require
    from common.owndata.embed import embedding_model, load_index

    require("faiss")
    path = Path(folder)
    index, paths, meta = load_index(path)
    problems = mismatches(meta, served, checkpoint)
    if problems:
        raise UserError(f"--index {folder} does not belong to the served model: {'; '.join(problems)}. Rebuild it "
                        f"with `convnets embed --checkpoint {checkpoint} --out {folder} COLLECTION`")  # fmt: skip
    if "checkpoint_sha256" not in meta or "image_size" not in meta:
        log.info("--index %s predates recorded checksums and sizes: only its arch and checkpoint path were compared",
                 folder)  # fmt: skip
    dev = resolve_device(device)
    trained = load_trained(checkpoint, dev)
    embed = EmbeddingRuntime(embedding_model(trained), dev, trained.pipeline.channels_last)
    dim = embed(np.zeros((1, 3, served.image_size, served.image_size), np.float32)).shape[1]
    if dim != index.d:
        raise UserError(f"--index {folder} holds {index.d}-dimensional vectors, the served model embeds in {dim}")
    return SimilarIndex(path, index, paths, meta, embed)


def parse_k(value: str | None, default: int, size: int) -> int:
    """The query parameter ``k``: an integer from 1 to the index size (``default``, capped, when absent)."""
    from common.serving.protocol import ProtocolError

    if value is None:
        return min(default, size)
    try:
        k = int(value)
    except ValueError:
        raise ProtocolError(f"query parameter 'k' must be an integer, got {value!r}") from None
    if not 1 <= k <= size:
        raise ProtocolError(f"query parameter 'k' must be between 1 and the index size {size}, got {k}")
    return k

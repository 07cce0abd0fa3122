"""``convnets embed`` and ``convnets similar``: penultimate-layer embeddings of a collection in a faiss index, and
the images nearest to a query image.

The embedding is what the classifier head receives: the registry names each model's head
(``get_model_spec(arch).head``), which is replaced by ``Identity``. Vectors are L2-normalised, so inner product is
cosine similarity. Up to ``EXACT_UP_TO`` vectors the index is exact (``IndexFlatIP``); beyond, an HNSW graph
(``IndexHNSWFlat``, M=32, efSearch=64), whose recall@10 against exact search and queries/s on 100,000 vectors
are measured by ``benchmarks/similar_bench.py``.

An index folder holds ``index.faiss``, ``paths.txt`` (row i of the index is line i), ``embeddings.npy`` and
``meta.json`` (checkpoint and its sha256, model, eval image and resize size, dimension, index type, the files that
could not be read): ``convnets serve --index`` refuses an index whose model differs from the one it serves.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import atomic_write_text, checkpoint_sha256
from common.data import Normalizer, eval_transform, load_rgb
from common.distributed import resolve_device
from common.errors import UserError
from common.owndata import require
from common.owndata.collection import list_collection, read_batches
from common.owndata.progress import Progress
from common.registry import get_model_spec

log = logging.getLogger("convnets")

EXACT_UP_TO = 50_000
# efSearch 64: recall@10 1.0 at 3.6x the queries/s of exact search on 100,000 vectors (similar_bench.json).
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 64


def embedding_model(trained) -> torch.nn.Module:
    """The trained model with its classifier head replaced by Identity: it returns the head's input."""
    head = get_model_spec(trained.config["arch"]).head
    trained.model.set_submodule(head, torch.nn.Identity())
    return trained.model.eval()


def embed_images(model, normalize, images: torch.Tensor, device) -> np.ndarray:
    """L2-normalised embeddings of a uint8 NCHW batch (``eval_transform``'s output)."""
    return embed_normalized(model, normalize(images.to(device)))


def embed_normalized(model, batch: torch.Tensor) -> np.ndarray:
    """L2-normalised embeddings of a batch already normalised and on the model's device (the server's input)."""
    with torch.no_grad():
        vectors = model(batch).float().flatten(1)
    return torch.nn.functional.normalize(vectors, dim=1).cpu().numpy()


def nearest(index, paths: list[str], vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """For each row of ``vectors``, its ``k`` nearest indexed images as (path, cosine similarity), best first. HNSW
    may find fewer than k, padding with id -1: those are left out."""
    scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    return [
        [(paths[i], float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
        for row_s, row_i in zip(scores, ids, strict=True)
    ]


def model_record(trained) -> dict:
    """What meta.json records of the embedding network: a query must be embedded by the same one."""
    return {"arch": trained.config["arch"], "image_size": trained.pipeline.image_size,
            "resize_size": trained.pipeline.resize_size}  # fmt: skip


def build_index(vectors: np.ndarray, kind: str):
    """A faiss inner-product index over ``vectors``: ``flat`` (exact), ``hnsw``, or ``auto`` (flat up to
    ``EXACT_UP_TO`` vectors, HNSW beyond)."""
    import faiss

    if kind == "auto":
        kind = "flat" if len(vectors) <= EXACT_UP_TO else "hnsw"
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index, kind


def run_embed(cfg) -> int:
    """Embed every image of ``cfg.paths`` and write the index folder ``cfg.out``.

    Under torchrun each rank embeds its ``eval_shard`` of the files and saves its part in the index folder; rank 0
    joins the parts (in path order, as one process would have them) and builds the one index.
    """
    from common import distributed as dist

    require("faiss")
    out = Path(cfg.out)
    if (
        out.is_dir()
        and any(p for p in out.iterdir() if not p.name.startswith(".part-"))
        and not (out / "meta.json").is_file()
    ):
        raise UserError(f"--out {out} is a non-empty folder that is not an embedding index; pick another")
    if (out / "meta.json").is_file() and not cfg.overwrite:
        raise UserError(f"--out {out} holds an index already; pick another folder or pass --overwrite to replace it")
    runtime = dist.init_distributed(cfg.device)
    try:
        dist.barrier()  # every rank has checked --out before any writes its part there
        paths, vectors, bad, model = embed_shard(cfg, runtime.device, runtime.rank, runtime.world_size)
        out.mkdir(parents=True, exist_ok=True)
        if runtime.world_size > 1:
            np.save(out / f".part-rank{runtime.rank}.npy", vectors)
            atomic_write_text(out / f".part-rank{runtime.rank}.json", json.dumps({"paths": paths, "bad": bad}))
            dist.barrier()
            if runtime.is_main:
                paths, vectors, bad = join_parts(out, runtime.world_size)
        if runtime.is_main:
            write_index(out, paths, vectors, bad, cfg, model)
        bad_count = sum(dist.all_gather_object(len(bad)))
    finally:
        dist.cleanup()
    return 1 if bad_count else 0


def embed_shard(cfg, device, rank: int = 0, world: int = 1) -> tuple[list[str], np.ndarray, dict[str, str], dict]:
    """``(paths, L2-normalised embeddings, {path: why unreadable}, model_record)`` of this rank's share of the
    files."""
    from common.data import eval_shard
    from common.inference import load_trained

    trained = load_trained(cfg.checkpoint, device)
    model = embedding_model(trained)
    normalize = Normalizer(device, trained.pipeline.channels_last)
    files, _ = list_collection(cfg.paths)
    files = [files[i] for i in eval_shard(len(files), rank, world)]
    progress = Progress(len(files), "embedding" if world == 1 else f"embedding (rank {rank})")
    paths, parts, bad, done = [], [], {}, 0
    for batch in read_batches(files, eval_transform(trained.pipeline), cfg.batch_size, cfg.workers):
        if batch.good:
            parts.append(embed_images(model, normalize, batch.images, device))
            paths += [batch.paths[k] for k in batch.good]
        bad |= {batch.paths[k]: why for k, why in batch.errors.items()}
        done += len(batch.paths)
        progress.update(done)
    progress.close()
    dim = parts[0].shape[1] if parts else 0
    return paths, np.concatenate(parts) if parts else np.zeros((0, dim), np.float32), bad, model_record(trained)


def join_parts(out: Path, world: int) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """The ranks' parts as one sorted list of paths, their vectors and the unreadable files; the parts removed."""
    paths, vectors, bad = [], [], {}
    for r in range(world):
        meta = json.loads((out / f".part-rank{r}.json").read_text())
        part = np.load(out / f".part-rank{r}.npy")
        if len(part):
            paths += meta["paths"]
            vectors.append(part)
        bad |= meta["bad"]
    order = np.argsort(np.array(paths, dtype=object), kind="stable") if paths else np.zeros(0, int)
    joined = np.concatenate(vectors)[order] if vectors else np.zeros((0, 0), np.float32)
    for r in range(world):
        (out / f".part-rank{r}.json").unlink()
        (out / f".part-rank{r}.npy").unlink()
    return [paths[i] for i in order], joined, dict(sorted(bad.items()))


def write_index(out: Path, paths: list[str], vectors: np.ndarray, bad: dict[str, str], cfg, model: dict) -> None:
    import faiss

    if not paths:
        raise UserError(f"none of the files could be read: {next(iter(bad.items()), '')}")
    index, kind = build_index(vectors, cfg.index_type)
    tmp = out / ".index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / "index.faiss")
    with open(out / ".embeddings.npy.tmp", "wb") as f:
        np.save(f, vectors)
    os.replace(out / ".embeddings.npy.tmp", out / "embeddings.npy")
    atomic_write_text(out / "paths.txt", "".join(p + "\n" for p in paths))
    meta = {"checkpoint": os.path.abspath(cfg.checkpoint), "checkpoint_sha256": checkpoint_sha256(cfg.checkpoint),
            **model, "dim": vectors.shape[1], "count": len(paths), "index": kind, "bad": bad}  # fmt: skip
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))  # last: its presence marks a complete index
    for path, why in bad.items():
        log.warning("left out %s: %s", path, why)
    log.info("%s: %d images, %d-dimensional embeddings of %s, %s index", out, len(paths), vectors.shape[1],
             model["arch"], kind)  # fmt: skip


def load_index(folder: Path):
    """``(faiss index, paths, meta)`` of an index folder written by ``convnets embed``."""
    import faiss

    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"--index {folder} is not an embedding index (no meta.json; build one with convnets embed)")
    meta = json.loads(meta_path.read_text())
    paths = (folder / "paths.txt").read_text().splitlines()
    index = faiss.read_index(str(folder / "index.faiss"))
    if index.ntotal != len(paths):
        raise UserError(f"{folder}: index.faiss holds {index.ntotal} vectors but paths.txt {len(paths)} paths")
    return index, paths, meta


def run_similar(cfg) -> int:
    """The ``cfg.k`` nearest images of the index to each query image, as JSON lines."""
    from common.inference import load_trained

    require("faiss")
    if cfg.k < 1:
        raise UserError(f"-k must be at least 1, got {cfg.k}")
    index, paths, meta = load_index(Path(cfg.index))
    checkpoint = cfg.checkpoint or meta["checkpoint"]
    if not Path(checkpoint).is_file():
        raise UserError(f"the index was built with {checkpoint}, which is gone; pass --checkpoint")
    device = resolve_device(cfg.device)
    trained = load_trained(checkpoint, device)
    if trained.config["arch"] != meta["arch"]:
        raise UserError(f"--checkpoint {checkpoint} is a {trained.config['arch']}, the index holds {meta['arch']}")
    model = embedding_model(trained)
    normalize = Normalizer(device, trained.pipeline.channels_last)
    transform = eval_transform(trained.pipeline)
    for image in cfg.images:
        try:
            tensor = transform(load_rgb(image))
        except FileNotFoundError:
            raise UserError(f"{image}: no such file") from None
        except Exception as e:  # noqa: BLE001 - any decoding failure ends with the file named
            raise UserError(f"{image}: cannot decode ({type(e).__name__}: {e})") from None
        vector = embed_images(model, normalize, tensor[None], device)
        (found,) = nearest(index, paths, vector, min(cfg.k, len(paths)))
        hits = [{"path": path, "score": round(score, 6)} for path, score in found]
        print(json.dumps({"query": image, "similar": hits}), flush=True)
    return 0

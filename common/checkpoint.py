"""Checkpoints: atomic saves (on common.atomic), rotation, and loading that never unpickles arbitrary objects."""

from __future__ import annotations

import hashlib
import logging
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

# atomic_write_text lives with atomic_write in common.atomic (torch-free); imported here too, where the writers of
# results and reports have long found it.
from common.atomic import atomic_write, atomic_write_text, remove_partial_writes  # noqa: F401
from common.errors import UserError

log = logging.getLogger(__name__)

EPOCH_PATTERN = re.compile(r"^checkpoint_epoch_(\d+)\.pt$")


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no code execution.

    Raises:
        UserError: naming the file when it is missing, truncated, corrupt, or holds unsafe objects.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
        reason = str(e).strip().split("\n")[0][:200]
        if reason.startswith("Weights only load failed"):
            # torch goes on to suggest weights_only=False: arbitrary code from the file, never our advice.
            reason = "not a file of tensors and plain values that torch.load can read safely"
        raise UserError(
            f"checkpoint {path} cannot be read (truncated, corrupt or not a checkpoint): {reason}"
        ) from None


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain lists so that ``weights_only`` loading accepts it."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available():
        # This rank's own GPU only (the current device, set by init_distributed): a resume on a machine with
        # fewer visible GPUs than the one that saved cannot restore states for devices it does not have.
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        device = torch.cuda.current_device()
        if isinstance(cuda, list | tuple):
            # Checkpoints written before per-rank states hold one state per GPU that rank could see; the rank's
            # own GPU had the index of its local rank there, as it has here.
            if device >= len(cuda):
                log.warning("checkpoint has no CUDA RNG state for cuda:%d; keeping the seeded one", device)
                return
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda, device)


def restore_rng(saved: list[dict] | dict, rank: int, world: int, fallback_seed: int) -> None:
    """Give this rank the generators it had when ``saved`` (one state per rank) was written.

    A run resumed on another number of processes cannot continue every stream: each rank is then seeded
    afresh from ``fallback_seed + rank``, so that ranks still draw different mixup and dropout values.
    """
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == world:
        set_rng_state(states[rank])
        return
    log.warning("checkpoint holds RNG states of %d processes, this run has %d: reseeding", len(states), world)
    torch.manual_seed(fallback_seed + rank)
    np.random.seed(fallback_seed + rank)
    random.seed(fallback_seed + rank)


def checkpoint_sha256(path: str) -> str:
    """The file's sha256: what ties an embedding index or an organized folder to the exact weights that made it (a
    path can be overwritten)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointManager:
    """Saves ``checkpoint_epoch_NNNN.pt`` each epoch and ``best.pt``, keeping the last ``keep_last`` epochs."""

    def __init__(self, folder: Path, keep_last: int = 3):
        self.folder = Path(folder)
        self.keep_last = max(1, keep_last)

    def epoch_files(self) -> list[Path]:
        """Epoch checkpoints in the folder, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := EPOCH_PATTERN.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict, epoch: int, is_best: bool) -> Path:
        path = self.folder / f"checkpoint_epoch_{epoch:04d}.pt"
        atomic_save(state, path)
        if is_best:
            atomic_save(state, self.folder / "best.pt")
        for old in self.epoch_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[dict, Path] | None:
        """The newest epoch checkpoint that loads; a corrupt one is reported and the previous one tried. The
        temporary files of saves killed mid-way are removed first (nothing else writes into the run folder now)."""
        for partial in remove_partial_writes(self.folder):
            log.info("--resume auto: removed %s, left by a checkpoint save that was interrupted", partial)
        for path in reversed(self.epoch_files()):
            try:
                return load_checkpoint(path), path
            except UserError as e:
                log.warning("--resume auto: %s; trying the previous checkpoint", e)
        return None

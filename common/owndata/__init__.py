"""Your own images: prepare a raw folder or CSV as an ImageFolder data set, sort an untagged collection with a
trained model, and search it by similarity.

- :mod:`~common.owndata.dedup`: perceptual hashes and near-duplicate groups (faiss multi-index hashing).
- :mod:`~common.owndata.dataset`: ``convnets prepare folder|csv``: check, deduplicate, split, write, report.
- :mod:`~common.owndata.report`: the Markdown, JSON and PNG report of a prepared data set.
- :mod:`~common.owndata.organize`: ``convnets predict --organize``: restartable sorting of a collection.
- :mod:`~common.owndata.embed`: ``convnets embed`` and ``convnets similar``.
"""

from __future__ import annotations

import importlib.util
import logging

from common.errors import UserError


def require(*modules: str) -> None:
    """Stop with the install line when an optional dependency of these commands is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"this command needs {', '.join(missing)}: pip install -e '.[owndata]' (imagehash, faiss-cpu)")


# faiss's loader logs at INFO which CPU build it tried ("No module named 'faiss.swigfaiss_avx2'"): not news to a user.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

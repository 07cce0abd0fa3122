"""The metadata that travels with every export (``convnets.json`` beside the model file, and inside TorchScript and
torch.export archives): what a server needs to run the model correctly without the training checkpoint. No torch
here: the ONNX Runtime server reads it too."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import UserError

METADATA_FILE = "convnets.json"
LABELS_FILE = "labels.txt"


@dataclass
class ModelMetadata:
    """Everything needed to serve an exported model correctly without the training checkpoint."""

    arch: str
    classes: list[str]
    image_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    input_name: str = "input"
    output_name: str = "probabilities"
    channels_last: bool = False
    format: str = "checkpoint"
    model_file: str | None = None
    # Multi-label models: the probabilities are a sigmoid per label, and a label applies at or above its threshold
    # (tuned on the validation set in training).
    multilabel: bool = False
    thresholds: list[float] | None = None
    # "fp32", "fp16" (TensorRT) or "int8"; an INT8 model's inputs and outputs stay float32 (servers feed it as they
    # feed the FP32 one), and ``quantization`` says how it was calibrated and the top-1 it was checked at.
    precision: str = "fp32"
    quantization: dict | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, folder: Path) -> ModelMetadata:
        path = Path(folder) / METADATA_FILE
        if not path.is_file():
            raise UserError(f"{folder} holds no {METADATA_FILE}: is it a folder written by `convnets export`?")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise UserError(f"{path} is not a valid export description: {e}") from None

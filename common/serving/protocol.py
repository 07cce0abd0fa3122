"""The KServe v2 / Open Inference Protocol on the wire: JSON requests and responses, and Triton's binary tensor
extension (a JSON header of ``Inference-Header-Content-Length`` bytes, then the raw tensors in input order)."""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field

import numpy as np

IMAGE_INPUT = "image"  # BYTES, one encoded image (JPEG, PNG, ...) per element
PROBABILITIES = "probabilities"
TOP_CLASSES = "top_classes"
TOP_SCORES = "top_scores"
OUTPUTS = (PROBABILITIES, TOP_CLASSES, TOP_SCORES)
DTYPES = {"FP32": np.float32, "BYTES": np.object_}


class ProtocolError(ValueError):
    """A request the server cannot accept, answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    id: str | None
    kind: str  # "tensor": a normalised FP32 batch; "images": encoded image bytes
    tensor: np.ndarray | None = None
    images: list[bytes] = field(default_factory=list)
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    binary_outputs: set[str] = field(default_factory=set)
    top_k: int = 5

    @property
    def batch(self) -> int:
        return len(self.tensor) if self.kind == "tensor" else len(self.images)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length is not an integer: {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the request is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    return request, binary


def _deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    """Triton's BYTES layout: each element is a 4-byte little-endian length, then that many bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: BYTES data ends inside an element's length prefix")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element claims {n} bytes, only {len(raw) - offset} follow")
        out.append(raw[offset : offset + n])
        offset += n
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def parse_infer(body: bytes, header_length: str | None, image_size: int, num_classes: int, top_k: int) -> InferRequest:
    """Validate a request against this model; every problem becomes a ProtocolError naming the field."""
    request, binary = _split_body(body, header_length)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"'inputs' must be a list of exactly one tensor: 'input' (FP32 [N,3,{image_size},"
                            f"{image_size}]) or 'image' (BYTES [N])")  # fmt: skip
    tensor = inputs[0]
    name, dtype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    expected = {"input": "FP32", IMAGE_INPUT: "BYTES"}
    if name not in expected:
        raise ProtocolError(f"unknown input name {name!r}: this model takes 'input' (FP32) or 'image' (BYTES)")
    if dtype != expected[name]:
        raise ProtocolError(f"input {name!r} must have datatype {expected[name]}, got {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of integers, got {shape!r}")
    if name == "input" and (len(shape) != 4 or shape[1:] != [3, image_size, image_size] or shape[0] < 1):
        raise ProtocolError(f"input 'input' must have shape [N,3,{image_size},{image_size}] with N >= 1, got {shape}")
    if name == IMAGE_INPUT and (len(shape) not in (1, 2) or shape[0] < 1 or shape[1:] not in ([], [1])):
        raise ProtocolError(f"input 'image' must have shape [N] or [N,1] with N >= 1, got {shape}")
    count = int(np.prod(shape))

    params = tensor.get("parameters") or {}
    binary_size = params.get("binary_data_size") if isinstance(params, dict) else None
    if binary_size is not None:
        if binary_size != len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {binary_size} but {len(binary)} bytes follow")
        if name == "input":
            if len(binary) != count * 4:
                raise ProtocolError(
                    f"input 'input': {len(binary)} bytes of binary data, shape {shape} needs {count * 4}"
                )
            array = np.frombuffer(binary, dtype="<f4").reshape(shape).astype(np.float32, copy=False)
            parsed = InferRequest(request.get("id"), "tensor", tensor=array)
        else:
            items = _deserialize_bytes(binary, name)
            if len(items) != count:
                raise ProtocolError(f"input 'image': shape {shape} but {len(items)} BYTES elements")
            parsed = InferRequest(request.get("id"), "images", images=items)
    else:
        if binary:
            raise ProtocolError("binary data follows the JSON header but no input declares binary_data_size")
        data = tensor.get("data")
        if data is None:
            raise ProtocolError(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
        if name == "input":
            try:
                array = np.asarray(data, dtype=np.float32)
            except (ValueError, TypeError):
                raise ProtocolError("input 'input': 'data' must be numbers (flat or nested lists)") from None
            if array.size != count:
                raise ProtocolError(f"input 'input': {array.size} values in 'data', shape {shape} needs {count}")
            parsed = InferRequest(request.get("id"), "tensor", tensor=array.reshape(shape))
        else:
            flat = data if isinstance(data, list) else [data]
            flat = [x for row in flat for x in (row if isinstance(row, list) else [row])]
            if len(flat) != count or not all(isinstance(x, str) for x in flat):
                raise ProtocolError(f"input 'image': 'data' must hold {count} base64 strings for shape {shape}")
            try:
                items = [base64.b64decode(x, validate=True) for x in flat]
            except ValueError:
                raise ProtocolError("input 'image': JSON 'data' must be base64-encoded image files") from None
            parsed = InferRequest(request.get("id"), "images", images=items)
    if parsed.kind == "tensor" and not np.isfinite(parsed.tensor).all():
        raise ProtocolError("input 'input' holds NaN or infinite values")

    request_params = request.get("parameters") or {}
    if not isinstance(request_params, dict):
        raise ProtocolError("'parameters' must be a JSON object")
    parsed.top_k = request_params.get("top_k", top_k)
    if not isinstance(parsed.top_k, int) or isinstance(parsed.top_k, bool) or parsed.top_k < 1:
        raise ProtocolError(f"parameter 'top_k' must be a positive integer, got {parsed.top_k!r}")
    parsed.top_k = min(parsed.top_k, num_classes)
    binary_all = request_params.get("binary_data_output") is True
    wanted = request.get("outputs")
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
            raise ProtocolError("'outputs' must be a list of objects with a 'name'")
        names = [o.get("name") for o in wanted]
        unknown = [n for n in names if n not in OUTPUTS]
        if unknown:
            raise ProtocolError(f"unknown output {unknown[0]!r}: this model has {', '.join(OUTPUTS)}")
        parsed.outputs = names
        parsed.binary_outputs = {
            o["name"] for o in wanted if (o.get("parameters") or {}).get("binary_data", binary_all) is True
        }
    elif binary_all:
        parsed.binary_outputs = set(OUTPUTS)
    return parsed


def build_response(
    model: str, request: InferRequest, probs: np.ndarray, classes: list[str]
) -> tuple[bytes, int | None]:
    """(body, JSON header length when binary outputs follow it)."""
    k = request.top_k
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    tensors = {
        PROBABILITIES: ("FP32", list(probs.shape), probs.astype(np.float32)),
        TOP_SCORES: ("FP32", [len(probs), k], np.take_along_axis(probs, top, 1).astype(np.float32)),
        TOP_CLASSES: ("BYTES", [len(probs), k], [[classes[i] for i in row] for row in top]),
    }
    outputs, chunks = [], []
    for name in request.outputs:
        dtype, shape, value = tensors[name]
        entry = {"name": name, "datatype": dtype, "shape": shape}
        if name in request.binary_outputs:
            raw = value.tobytes() if dtype == "FP32" else serialize_bytes([c.encode() for r in value for c in r])
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = value.ravel().tolist() if dtype == "FP32" else [c for r in value for c in r]
        outputs.append(entry)
    body = {"model_name": model, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        body["id"] = request.id
    head = json.dumps(body, separators=(",", ":")).encode()
    return (head + b"".join(chunks), len(head)) if chunks else (head, None)

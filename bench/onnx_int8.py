"""The dynamic-int8 ONNX variant the benchmark compares against fp32 (never used by the daemon).

onnxruntime.quantization.quantize_dynamic: int8 weights, activations quantised per run. It is not a
drop-in: a window's score depends on the rest of its batch (the activation scales are per run), and the
decisions it changes on the ECG5000 test split are measured in bench/RESULTS.md.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from monitor.model.artifact import ModelArtifact
from monitor.model.onnx_backend import OnnxScorer, export_onnx, session_options


def quantize_int8(model_bytes: bytes) -> bytes:
    """Dynamic int8 quantisation of an exported model (weights int8, activations per batch)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="monitor-onnx-") as directory:
        source, target = Path(directory) / "fp32.onnx", Path(directory) / "int8.onnx"
        source.write_bytes(model_bytes)
        logging.disable(logging.WARNING)  # quantize_dynamic advises "pre-processing" on the root logger: not for LSTMs
        try:
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load_model(str(target)).SerializeToString()


def int8_scorer(artifact: ModelArtifact, threads: int = 0) -> OnnxScorer:
    """An `OnnxScorer` running the int8 quantisation of the artifact's scoring graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        quantize_int8(export_onnx(artifact)), session_options(threads), providers=["CPUExecutionProvider"]
    )
    return OnnxScorer(artifact, threads=threads, session=session)

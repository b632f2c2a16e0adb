"""ONNX Runtime scoring backend (`model.backend: onnx`): the same scores as `Scorer`, on the CPU.

At load the artifact's torch model is exported to ONNX in memory, together with the rest of
`Scorer.score` (normalisation, reconstruction, the per-timestep L1 profile and its mean), so one
`InferenceSession.run` turns raw `[B, W, C]` windows into `(errors [B], profiles [B, W])`. The
batch axis is dynamic. The fp32 export never touches the disk, nor the artifact directory.

The export uses torch's TorchScript-based exporter (`dynamo=False`): the newer torch.export-based
one needs `onnxscript`, which is not a dependency of this project. Scores agree with the torch
`Scorer` to about 1e-6 (tests/test_onnx_backend.py states the tolerance and checks that the same
windows of the ECG5000 test split are flagged).

`quantize=True` gives a dynamic-int8 variant (onnxruntime.quantization.quantize_dynamic: int8
weights, activations quantised per run). It is not a drop-in: on the default model it moves normal
beats' scores by 8 % (median), 6-7 of the 3,103 test decisions change (bench/RESULTS.md has the
measured difference), a window's score depends on the rest of its batch (the activation scales are
per run: up to 12 % between batch 1 and 64), and it is not consistently faster than torch at E=32.
`model.backend: onnx` uses fp32; int8 exists for the benchmark.

Requires the `onnx` extra: `pip install -e '.[onnx]'`.
"""

from __future__ import annotations

import copy
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from monitor.artifact import ModelArtifact
from monitor.errors import ConfigError
from monitor.scoring import Scores, ScoringEngine, ScoringGraph

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - depends on the installed extras
    ort = None

OPSET = 17
RUN_BATCH = 64  # larger batches are run in slices of this size: ORT's LSTM slows beyond it (~15 % at 512), same scores
INPUT = "windows"
OUTPUTS = ("errors", "profiles")


def export_onnx(artifact: ModelArtifact) -> bytes:
    """The scoring graph of an artifact as a serialised ONNX model with a dynamic batch axis."""
    model = copy.deepcopy(artifact.model).cpu().eval().requires_grad_(False)
    graph = ScoringGraph(model, artifact.normalisation.mean, artifact.normalisation.std).eval()
    example = torch.zeros(2, artifact.window, artifact.channels, dtype=torch.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is deprecated, about traced Python booleans inside
        # nn.LSTM and about LSTM batch sizes; none applies here (the batch tests cover 1..N).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_axes={INPUT: {0: "batch"}, OUTPUTS[0]: {0: "batch"}, OUTPUTS[1]: {0: "batch"}},
        )
    return buffer.getvalue()


def quantize_int8(model_bytes: bytes) -> bytes:
    """Dynamic int8 quantisation of an exported model (weights int8, activations per batch)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="monitor-onnx-") as directory:
        source, target = Path(directory) / "fp32.onnx", Path(directory) / "int8.onnx"
        source.write_bytes(model_bytes)
        logging.disable(logging.WARNING)  # quantize_dynamic advises "pre-processing" on the root logger: not applicable to LSTMs
        try:
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load_model(str(target)).SerializeToString()


def session_options(threads: int = 0, spinning: bool | None = None) -> ort.SessionOptions:
    """Sequential execution, all graph optimisations, `threads` intra-op threads (0 = ORT's default).

    `spinning=False` stops idle pool threads from busy-waiting, which helps when other processes
    want the cores; None keeps ORT's default (spin).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(int(threads), 0)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class OnnxScorer(ScoringEngine):
    """Scores `[B, W, C]` float windows with ONNX Runtime on the CPU; a drop-in for `Scorer.score`."""

    def __init__(self, artifact: ModelArtifact, threads: int = 0, quantize: bool = False, spinning: bool | None = None, run_batch: int = RUN_BATCH) -> None:
        if ort is None:
            raise ConfigError("model.backend: onnx needs onnxruntime and onnx (pip install 'monitor[onnx]')")
        self.artifact = artifact
        self.threads = threads
        self.quantized = quantize
        model_bytes = export_onnx(artifact)
        if quantize:
            model_bytes = quantize_int8(model_bytes)
        self.model_bytes = model_bytes
        self.session = ort.InferenceSession(model_bytes, session_options(threads, spinning), providers=["CPUExecutionProvider"])
        self._outputs = list(OUTPUTS)
        self.run_batch = max(int(run_batch), 1)

    def score(self, windows: np.ndarray) -> Scores:
        """Score one batch: one session run, or one per `run_batch` windows for a larger batch.

        In fp32 a window's score does not depend on the rest of its batch (the tests check it), so
        slicing changes no score; int8 scores depend on the batch anyway (see the module docstring)."""
        batch = np.ascontiguousarray(windows, dtype=np.float32)
        if len(batch) <= self.run_batch:
            errors, profiles = self.session.run(self._outputs, {INPUT: batch})
            return Scores(errors, profiles)
        parts = [self.session.run(self._outputs, {INPUT: batch[start : start + self.run_batch]}) for start in range(0, len(batch), self.run_batch)]
        return Scores(np.concatenate([part[0] for part in parts]), np.concatenate([part[1] for part in parts]))

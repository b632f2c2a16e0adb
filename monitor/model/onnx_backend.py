"""ONNX Runtime scoring backend (`model.backend: onnx`): the same scores as `Scorer`, on the CPU.

At load the artifact's torch model is exported to ONNX in memory, together with the rest of
`Scorer.score` (normalisation, reconstruction, the per-timestep L1 profile and its mean), so one
`InferenceSession.run` turns raw `[B, W, C]` windows into `(errors [B], profiles [B, W])`. The
batch axis is dynamic. The fp32 export never touches the disk, nor the artifact directory.

The export uses torch's TorchScript-based exporter (`dynamo=False`): the newer torch.export-based
one needs `onnxscript`, which is not a dependency of this project. Scores agree with the torch
`Scorer` to about 1e-6 (tests/unit/model/test_onnx_backend.py states the tolerance and checks that the same
windows of the ECG5000 test split are flagged).

The benchmark's int8 variant (`bench/measure.py`, `int8_scorer`) passes its own session in.

Requires the `onnx` extra: `pip install -e '.[onnx]'`.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch

from monitor.errors import ConfigError
from monitor.model.artifact import ModelArtifact
from monitor.model.scoring import BatchScorer, Scores, ScoringGraph

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - depends on the installed extras
    ort = None

OPSET = 17
RUN_BATCH = 64  # larger batches run in slices of this size: ORT's LSTM slows beyond it (bench/RESULTS.md), same scores
INPUT = "windows"
OUTPUTS = ("errors", "profiles", "channels")


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
            buffer,  # type: ignore[arg-type]  # torch's stub names paths only; a binary buffer is documented
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)},
        )
    return buffer.getvalue()


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Sequential execution, all graph optimisations, `threads` intra-op threads (0 = ORT's default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(int(threads), 0)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OnnxScorer(BatchScorer):
    """Scores `[B, W, C]` float windows with ONNX Runtime on the CPU; a drop-in for `Scorer.score`."""

    def __init__(
        self,
        artifact: ModelArtifact,
        threads: int = 0,
        run_batch: int = RUN_BATCH,
        session: ort.InferenceSession | None = None,
    ) -> None:
        """`session` replaces the fp32 export of `artifact` (the benchmark's int8 variant)."""
        if ort is None:
            raise ConfigError("model.backend: onnx needs onnxruntime and onnx (pip install 'monitor[onnx]')")
        if session is None:
            options = session_options(threads)
            session = ort.InferenceSession(export_onnx(artifact), options, providers=["CPUExecutionProvider"])
        self.session = session
        self._outputs = list(OUTPUTS)
        self.run_batch = max(int(run_batch), 1)

    def score(self, windows: np.ndarray) -> Scores:
        """Score one batch: one session run, or one per `run_batch` windows for a larger batch.

        In fp32 a window's score does not depend on the rest of its batch (the tests check it), so
        slicing changes no score."""
        batch = np.ascontiguousarray(windows, dtype=np.float32)
        if len(batch) <= self.run_batch:
            return Scores(*self.session.run(self._outputs, {INPUT: batch}))
        parts = [
            self.session.run(self._outputs, {INPUT: batch[start : start + self.run_batch]})
            for start in range(0, len(batch), self.run_batch)
        ]
        return Scores(*(np.concatenate([part[index] for part in parts]) for index in range(len(OUTPUTS))))

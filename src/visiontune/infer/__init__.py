"""Inference: the predictor (``vt.pipeline``), ONNX export and the inference benchmark.

``pipeline("runs/<name>")`` returns a :class:`Predictor`, a callable from images (paths, PIL images,
arrays, bytes, or lists of them) to top-k ``[{"label", "score"}]``; :func:`export_run` writes the
merged model as ONNX with its labels and preprocessing; :func:`bench_infer` times the predictor
merged vs unmerged. The multi-adapter HTTP service lives in :mod:`visiontune.serve`.
"""

from typing import Any

from visiontune.infer.predictor import Prediction, PredictionResult, Predictor, decode_bytes, pipeline, top_k_predictions

__all__ = ["Prediction", "PredictionResult", "Predictor", "bench_infer", "decode_bytes", "export_run", "format_bench",
           "pipeline", "top_k_predictions"]


def __getattr__(name: str) -> Any:
    # lazy re-exports keep `import visiontune.infer` light
    if name == "export_run":
        from visiontune.infer.export import export_run

        return export_run
    if name in ("bench_infer", "format_bench"):
        from visiontune.infer import bench

        return getattr(bench, name)
    raise AttributeError(f"module 'visiontune.infer' has no attribute {name!r}")

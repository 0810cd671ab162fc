"""Converters and graph rewrites: Keras -> ONNX and TFLite (each precision), post-training steps, Q/DQ insertion
(TensorRT's placement) and ONNX Runtime's int8 layout, ONNX -> TensorRT engine, and writing artifacts with their
manifests.

The public names, by module (imported on first use, so importing one module never loads its siblings):

- :mod:`~quantship.convert.onnx`: OnnxSpec, convert_to_onnx, onnx_node_layers
- :mod:`~quantship.convert.tflite`: TfliteConverter, TfliteSpec, convert_to_tflite
- :mod:`~quantship.convert.tensorrt`: EngineSpec, build_engine
- :mod:`~quantship.convert.qdq`: QdqReport, insert_qdq
- :mod:`~quantship.convert.ort_layout`: OrtWeights, OrtQdqReport, insert_ort_qdq
- :mod:`~quantship.convert.calibrated`: collect_statistics, write_outputs, write_ort_model
- :mod:`~quantship.convert.artifact`: write_artifact, write_onnx_artifact
- :mod:`~quantship.convert.layer_names`: KerasLayers, WEIGHTED_KERAS
- :mod:`~quantship.convert.ptq`: prepare_model
"""

from __future__ import annotations

from quantship.lazy import public_attributes

_PUBLIC = {
    "EngineSpec": "quantship.convert.tensorrt",
    "KerasLayers": "quantship.convert.layer_names",
    "OnnxSpec": "quantship.convert.onnx",
    "OrtQdqReport": "quantship.convert.ort_layout",
    "OrtWeights": "quantship.convert.ort_layout",
    "QdqReport": "quantship.convert.qdq",
    "TfliteConverter": "quantship.convert.tflite",
    "TfliteSpec": "quantship.convert.tflite",
    "WEIGHTED_KERAS": "quantship.convert.layer_names",
    "build_engine": "quantship.convert.tensorrt",
    "collect_statistics": "quantship.convert.calibrated",
    "convert_to_onnx": "quantship.convert.onnx",
    "convert_to_tflite": "quantship.convert.tflite",
    "insert_ort_qdq": "quantship.convert.ort_layout",
    "insert_qdq": "quantship.convert.qdq",
    "onnx_node_layers": "quantship.convert.onnx",
    "prepare_model": "quantship.convert.ptq",
    "write_artifact": "quantship.convert.artifact",
    "write_onnx_artifact": "quantship.convert.artifact",
    "write_ort_model": "quantship.convert.calibrated",
    "write_outputs": "quantship.convert.calibrated",
}
__all__ = sorted(_PUBLIC)
__getattr__ = public_attributes(__name__, _PUBLIC)

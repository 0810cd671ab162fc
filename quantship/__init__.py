"""quantship: Keras models to TFLite / ONNX / TensorRT artifacts, evaluated side by side.

Nothing heavy is imported here: TensorFlow, ONNX Runtime and TensorRT are loaded lazily by the modules
that wrap them, so ``import quantship`` and ``quantship --help`` work without them.
"""

__version__ = "0.1.0"

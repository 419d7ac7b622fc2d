"""ompq-plugin: OMPQ mixed-precision bit allocation, Brevitas quantization and QONNX export."""

__version__ = "0.1.0"

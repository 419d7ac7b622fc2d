"""Exporters: verified QONNX and QCDQ ONNX files for target compilers and runtimes."""

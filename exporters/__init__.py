"""Exporters: verified QONNX and QCDQ ONNX files for target compilers and runtimes."""

from .export_report import ExportReport, LayerExport
from .inspect import InspectTable, inspect_onnx
from .qcdq import export_qcdq
from .qonnx import export_qonnx

__all__ = ["ExportReport", "InspectTable", "LayerExport", "export_qcdq", "export_qonnx",
           "inspect_onnx"]

"""Export: ONNX files that ONNX Runtime runs."""

from torchslim.export.onnx import export_onnx, onnx_session, run_onnx

__all__ = ["export_onnx", "onnx_session", "run_onnx"]

"""Export: ONNX files that ONNX Runtime runs, torch.export programs and TorchScript (``export.verb``, which
``torchslim.export`` names as a verb)."""

from torchslim.export.onnx import export_onnx, onnx_session, run_onnx

__all__ = ["export_onnx", "onnx_session", "run_onnx"]

"""ONNX export (eval mode, BatchNorm folded into the preceding conv by the exporter) and ONNX Runtime sessions.

Example:
    >>> import torchslim as ts, tempfile, os
    >>> path = export_onnx(ts.models.create("lenet-5"), torch.zeros(1, 1, 28, 28), os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> run_onnx(onnx_session(path), torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.files import ModelFormat, refuse_overwrite, register_format, write_atomic
from torchslim.core.modes import eval_mode

INPUT_NAME, OUTPUT_NAME = "input", "output"


def export_onnx(
    model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike[str], opset: int = 17, dynamic_batch: bool = True, exporter: str = "torchscript"
) -> Path:
    """Write ``model`` (in eval mode; its mode is restored) to an ONNX file with a dynamic batch dimension.

    ``exporter`` "torchscript" is fast and folds BatchNorm into convolutions; "dynamo" uses torch.export.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                torch.onnx.export(
                    model,
                    (example_input,),
                    str(temporary),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    do_constant_folding=True,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
                )
            elif exporter == "dynamo":
                program = torch.onnx.export(
                    model,
                    (example_input,),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None,
                )
                program.save(str(temporary))
            else:
                raise TorchslimError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
        os.replace(temporary, path)
    except TorchslimError:
        raise
    except Exception as error:  # the exporter raises many types; name the model and the cause
        raise TorchslimError(f"ONNX export of {type(model).__name__} failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def onnx_session(path: str | os.PathLike[str] | bytes, threads: int = 2, spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session (from a file or the model's bytes) with a fixed intra-op thread count (spinning off
    by default, for fair timing)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, inputs: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: inputs.detach().cpu().numpy()})[0])


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind an nn.Module interface (for evaluate, the latency harness and ``save``). It
    keeps the model's bytes, so it saves as an ``.onnx`` file wherever the file it came from went."""

    def __init__(self, path: str | os.PathLike[str] | bytes, threads: int = 2, description: str = "ONNX Runtime") -> None:
        super().__init__()
        self.onnx_bytes = path if isinstance(path, bytes) else Path(path).read_bytes()
        self.path = None if isinstance(path, bytes) else str(path)
        self.description = description
        self.session = onnx_session(self.onnx_bytes, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_onnx(self.session, x)

    def save(self, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
        refuse_overwrite(path, overwrite)
        write_atomic(path, self.onnx_bytes)
        return Path(path)


def _save_onnx(model: nn.Module, path: Path, overwrite: bool = True) -> Path:
    if not isinstance(model, OnnxModule):
        raise TorchslimError(
            f"{path}: saving to .onnx takes a model that runs in ONNX Runtime (what quantize returns for an "
            f"int8 method); export a PyTorch model with torchslim.export.export_onnx(model, example_input, path)"
        )
    return model.save(path, overwrite=overwrite)


register_format(ModelFormat(".onnx", save=_save_onnx, load=lambda path, trust_factory=False: OnnxModule(path)))

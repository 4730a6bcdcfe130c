"""Model files: safetensors weights with a JSON architecture spec; safe loading of users' weight files."""

from torchslim.core.spec import model_spec
from torchslim.io.modelfile import build_from_spec, file_spec, load_huggingface, load_model, load_state, load_weights, save_model

__all__ = ["build_from_spec", "file_spec", "load_huggingface", "load_model", "load_state", "load_weights", "model_spec", "save_model"]

"""Model files: safetensors weights with a JSON architecture spec; safe loading of users' weight files."""

from torchslim.io.modelfile import build_from_spec, load_model, load_weights, model_spec, save_model

__all__ = ["build_from_spec", "load_model", "load_weights", "model_spec", "save_model"]

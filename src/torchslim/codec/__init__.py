"""The .tslim compressed file: sparse relative-index storage, codebook codes, and entropy coding (Huffman, ANS)."""

from torchslim.codec.entropy import CODERS, entropy_bytes
from torchslim.codec.tslim import encode_model, encoded_size, inspect_tslim, is_tslim, load_tslim, read_tslim, save_tslim

__all__ = ["CODERS", "encode_model", "encoded_size", "entropy_bytes", "inspect_tslim", "is_tslim", "load_tslim", "read_tslim", "save_tslim"]

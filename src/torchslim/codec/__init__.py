"""The .tslim compressed file: sparse relative-index storage, codebook codes, and entropy coding (Huffman, ANS);
written by ``codec.tslim``, read (with every declared size checked) by ``codec.reader``."""

from torchslim.codec.entropy import CODERS, entropy_bytes
from torchslim.codec.reader import MAX_ELEMENTS, inspect_tslim, is_tslim, load_tslim, read_tslim
from torchslim.codec.tslim import encode_model, encoded_size, save_tslim

__all__ = ["CODERS", "MAX_ELEMENTS", "encode_model", "encoded_size", "entropy_bytes", "inspect_tslim", "is_tslim", "load_tslim", "read_tslim", "save_tslim"]

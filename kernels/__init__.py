"""Attention kernels: Flash-Decoding for Medusa tree verification and its transformers integration.

Importing this package registers the "medusa_tree_decoding" (ATTN_NAME) attention implementation with transformers.
On CPU, set TRITON_INTERPRET=1 before importing it to run the Triton kernels in the interpreter.
"""

if __name__ == "medusa_toolkit.kernels":
    from .flash_decode import (
        MAX_TREE_NODES,
        SUPPORTED_HEAD_DIMS,
        PackedTreeMask,
        default_num_splits,
        dense_attention_mask,
        flash_decode,
        flash_decode_reference,
        pack_tree_mask,
    )
    from .hf_attention import ATTN_NAME, get_backend, medusa_attention_forward, register_attention, set_backend

    register_attention()
else:
    # Imported as a top-level `kernels` because the repo root is on sys.path (`python -m pytest` from the root):
    # transformers probes for the Hub's `kernels` library by importing that name in the middle of its own import.
    # Stay inert and look like a stray namespace folder (no __file__, no version) so the probe says "not installed".
    __file__ = None

__all__ = [
    "ATTN_NAME",
    "MAX_TREE_NODES",
    "PackedTreeMask",
    "SUPPORTED_HEAD_DIMS",
    "default_num_splits",
    "dense_attention_mask",
    "flash_decode",
    "flash_decode_reference",
    "get_backend",
    "medusa_attention_forward",
    "pack_tree_mask",
    "register_attention",
    "set_backend",
]

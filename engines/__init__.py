"""sdbridge's model side: model loading, prompt encoding and the per-frame stream pipeline.

Nothing here knows about OSC, sockets or shared memory.
"""
import os

# Models are only ever loaded from disk. Set before diffusers/transformers import huggingface_hub,
# so that no code path, ours or a library's, can reach a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

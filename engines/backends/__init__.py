"""How a stream's per-frame work runs on the device: the torch backend (eager, CUDA graphs,
torch.compile) here; a TensorRT backend will sit beside it behind the same stream."""

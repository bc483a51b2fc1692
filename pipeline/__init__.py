"""seqstream runtime: stateful ONNX step models served over streams.

This package depends on numpy and onnxruntime only; it never imports torch, so an
edge box can run it without the training stack. Training and export live in
``models`` (the ``seqstream[train]`` extra).
"""

__version__ = "0.1.0"

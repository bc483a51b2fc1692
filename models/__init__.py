"""Training side of seqstream (PyTorch): architectures, training, export, verification.

Needs the ``seqstream[train]`` extra. Importing ``models`` itself does not import torch
(the CLI registers its commands from here); the submodules do.
"""

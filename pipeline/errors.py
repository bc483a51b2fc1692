"""The exception tree of seqstream.

Every error that reaches a user derives from :class:`SeqstreamError`; the CLI turns
it into one line (``seqstream: error: <message>``) and a non-zero exit code instead
of a traceback. Third-party errors (onnxruntime, numpy parsing, TOML, paho) are
translated into these at the boundary where they occur, with the file or key named.

::

    SeqstreamError
    ├── ConfigError        bad configuration (key named)
    ├── DataError          a data file cannot be parsed (file and line named)
    ├── ModelError         a model file is unreadable, corrupt or breaks the contract
    │   └── ContractError  the seqstream metadata is missing or invalid (field named)
    ├── CheckpointError    a state checkpoint cannot be written or restored
    └── DependencyError    an optional extra (train, audio) is not installed
"""

from __future__ import annotations


class SeqstreamError(Exception):
    """Base class: anything seqstream raises on purpose."""


class ConfigError(SeqstreamError):
    """Configuration is invalid; the message names the key and the problem."""


class DataError(SeqstreamError):
    """A data file cannot be used; the message names the file (and line) and the problem."""


class ModelError(SeqstreamError):
    """A model file cannot be loaded or does not fit what the caller needs."""


class ContractError(ModelError):
    """The model's ``seqstream`` metadata is missing, unsupported or inconsistent."""


class CheckpointError(SeqstreamError):
    """A state checkpoint cannot be saved or restored."""


class DependencyError(SeqstreamError):
    """An optional dependency is missing; the message names the extra to install."""

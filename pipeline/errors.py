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
    ├── BrokerError        the MQTT broker cannot be reached or refuses the daemon at start
    ├── PayloadError       one incoming message is rejected (``reason`` is counted, never fatal)
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


class BrokerError(SeqstreamError):
    """The MQTT broker is unreachable or refuses the connection (host and reason named)."""


class PayloadError(SeqstreamError):
    """One incoming message cannot be used; ``reason`` is a stable snake_case word.

    Raised per message by :mod:`pipeline.sources.codecs` and caught by the source, which counts
    the reason and reports it; it never stops the daemon or touches any stream's state.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

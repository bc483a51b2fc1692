"""Audio front end shared by training and serving: framing, log-mel, WAV files.

One implementation, numpy only: training reads WAV folders through
:mod:`pipeline.offline.wavfolders` and the daemon feeds microphone blocks through
:class:`pipeline.features.logmel.StreamingLogMel`; both call the same per-frame code, and
the settings travel in the model's metadata (``frontend``) so the runtime rebuilds the
extractor the model was trained with.
"""

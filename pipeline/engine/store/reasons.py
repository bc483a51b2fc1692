"""Why a stream's state was reset: stable words for counters, logs and results.

Their own module, below both the store and its admission rules, which each cause some.
"""

RESET_EXPLICIT = "explicit"  # a caller asked (Engine.reset, Worker.submit_reset)
RESET_IDLE = "idle"  # no step for longer than idle_timeout_s
RESET_SEQ_GAP = "seq_gap"  # more sequence numbers missing than seq_gap_tolerance
RESET_TS_GAP = "ts_gap"  # timestamps further apart than ts_gap_tolerance_s
RESET_MODEL_CHANGE = "model_change"  # a new model cannot continue the old state
RESET_EVICTED = "evicted"  # least recently used stream dropped beyond max_streams
RESET_NON_FINITE = "non_finite_state"  # the model produced NaN/Inf state
RESET_DROPPED = "dropped"  # a step of the stream was dropped before the engine saw it
RESET_ENGINE_ERROR = "engine_error"  # onnxruntime failed on the stream's batch
RESET_REASONS: tuple[str, ...] = (
    RESET_EXPLICIT,
    RESET_IDLE,
    RESET_SEQ_GAP,
    RESET_TS_GAP,
    RESET_MODEL_CHANGE,
    RESET_EVICTED,
    RESET_NON_FINITE,
    RESET_DROPPED,
    RESET_ENGINE_ERROR,
)

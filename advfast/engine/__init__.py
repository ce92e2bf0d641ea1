"""The attack engine: typed per-sample rows (:mod:`.rows`), one iteration (:mod:`.core`), the
drivers that repeat it (:mod:`.drivers`), the optimisers (:mod:`.optim`) and controls
(:mod:`.control`) that plug into it, and its timing (:mod:`.timing`)."""

from advfast.engine.core import (AMPS, COMPILE_MODES, FAILURES, MAX_TRAJECTORY_BYTES,
                                 TRAJECTORY, Control, Engine, Head, Optimizer, frozen, norms_of)
from advfast.engine.drivers import Stream, buckets, run_fixed
from advfast.engine.rows import Rows, State, start_rows

__all__ = ["AMPS", "COMPILE_MODES", "FAILURES", "MAX_TRAJECTORY_BYTES", "TRAJECTORY", "Control",
           "Engine", "Head", "Optimizer", "Rows", "State", "Stream", "buckets", "frozen",
           "norms_of", "run_fixed", "start_rows"]

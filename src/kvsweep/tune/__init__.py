"""Ray Tune sweeps. The only kvsweep package that imports ray.

``run_sweep(sweep, space)`` checks the search space, the storage, the lock and the stored specification
before Ray starts, tokenizes the data and evaluates the base once on the driver, runs one trial per
configuration (one report and checkpoint per epoch, a scheduler that stops weak trials at rungs: by default
multi-objective ASHA on ``val_ppl`` and KV bytes/token; failed trials restarted from their last checkpoint),
and gathers the results into ``trials.parquet``, ``epochs.parquet`` and ``positions.parquet`` in the sweep's
folder. Running the same sweep again continues it; ``grow=True`` adds the configurations its search space
gained.

Modules: ``space`` (search space -> typed trial configs), ``spec`` (the stored specification),
``store`` (the sweep's folder), ``lock`` (one driver per sweep), ``scheduler`` (rungs that survive a killed
driver and judge a trial once its schedule weights the LM term; ASHA), ``moasha`` (multi-objective ASHA),
``guard`` (a full disk stops the sweep cleanly), ``trainable`` and ``packed`` (the trials), ``rounds`` (one
round as one Tune experiment, its scheduler), ``writer`` (the result tables), ``console`` (one line per trial
event and a progress line), ``tensorboard`` (each trial's event files), ``summary`` (what the driver prints at its end), ``local`` (the in-process Ray of a local sweep), ``driver`` (``run_sweep``).
"""

from .driver import SweepInterrupted, SweepOutcome, evaluate_base, prepare_samples, run_sweep
from .space import DEFAULT_POINT, absolute_paths, grid_points, model_dims, point_key, trial_cfg, space_fields, validate_space, variant_name
from .summary import summarize
from .writer import TrialRecord, build_tables, write_tables

__all__ = [
    "DEFAULT_POINT", "SweepInterrupted", "SweepOutcome", "TrialRecord", "absolute_paths", "build_tables", "evaluate_base",
    "grid_points", "model_dims", "point_key", "prepare_samples", "run_sweep", "space_fields", "summarize", "trial_cfg", "validate_space",
    "variant_name", "write_tables",
]

"""The typed metrics train, pack and tune share, and the result tables in DESIGN.md's schema (pyarrow, atomic).

    trials.parquet     one row per trial: config, status, best/base PPL, KV bytes/token, parameters, time
    epochs.parquet     one row per trial and epoch (epoch 0: the adapters at init): ``EpochMetrics``
    positions.parquet  one row per trial, split (validation, test) and position bucket: ``PositionMetrics`` (the trial's
                       best epoch, chosen on validation, against the base)

A trial's life produces one ``EpochReport`` per epoch (its ``EpochMetrics``, its validation PPL per position
bucket, the trial's ``TrialConstants``) and, at its end, a ``TrialResult``. Ray Tune needs flat dicts:
``EpochReport.to_report`` and ``EpochReport.from_report`` are the one place where the flat names are spelled.
``EPOCH_SCHEMA`` and ``POSITION_SCHEMA`` are derived from the fields of ``EpochMetrics`` and ``PositionMetrics``,
so a renamed field changes the schema (and fails a test) instead of becoming a silent null.
"""

from .metrics import (ARROW_TYPES, BUCKET_PREFIXES, SPLITS, optional_inner, BucketPPL, EpochMetrics, EpochReport, PositionMetrics, TrialConstants, TrialResult, arrow_schema, bucket_key, is_true, position_metrics, reports_of)
from .tables import (EPOCH_SCHEMA, POSITION_SCHEMA, READABLE_VERSIONS, SCHEMA_VERSION, SchedulerSavings, TRIAL_SCHEMA, TRIAL_STATUSES, epoch_table, option_column_names, position_table, scheduler_savings, table, trial_schema, upgrade, with_schema_version, write_parquet)

__all__ = ['ARROW_TYPES', 'BUCKET_PREFIXES', 'SPLITS', 'optional_inner', 'BucketPPL', 'EPOCH_SCHEMA', 'EpochMetrics', 'EpochReport', 'POSITION_SCHEMA', 'PositionMetrics', 'READABLE_VERSIONS', 'SCHEMA_VERSION', 'SchedulerSavings', 'TRIAL_SCHEMA', 'TRIAL_STATUSES', 'TrialConstants', 'TrialResult', 'arrow_schema', 'bucket_key', 'epoch_table', 'is_true', 'option_column_names', 'position_metrics', 'position_table', 'reports_of', 'scheduler_savings', 'table', 'trial_schema', 'upgrade', 'with_schema_version', 'write_parquet']

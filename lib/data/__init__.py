"""From a RadioMapSeer-layout folder to batches: the layout and its pixels, the splits, the packed
cache, the datasets, batching, the stage-2 condition, and the embedded synthetic city."""

from lib import exports

# The names the scripts import from the package, and their modules.
__getattr__ = exports(__name__, {
    "train_batches": "batching", "eval_batches": "batching",
    "STAGE_FIELDS": "dataset", "build_datasets": "dataset", "prepare_data": "dataset",
    "protocol_warnings": "splits", "split_record": "splits", "check_overlap": "splits",
    "data_mismatch": "splits",
    "MeasurementSpec": "measurements", "parse_spec": "measurements", "draw_mask": "measurements",
    "fixed_mask": "measurements", "with_measurements": "measurements",
})

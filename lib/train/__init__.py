"""A training run: its folder and log, the accelerator and precision, optimizer, LR schedule,
EMA, checkpoints and resume, the fault policy, and trained weights found and loaded again."""

from lib import exports

# The names the scripts import from the package, and their modules.
__getattr__ = exports(__name__, {
    "Run": "run", "print_dry_run": "run",
    "prepare_model": "accel",
    "any_process": "optim", "build_optimizer": "optim", "update": "optim",
    "build_scheduler": "schedule", "check_schedules": "schedule",
    "ema_files": "ema", "ema_state": "ema", "ema_weights": "ema", "make_ema": "ema",
    "FaultPolicy": "faults",
    "MeanTracker": "runlog", "mean_logs": "runlog",
    "load_vae": "weights", "stage1_checkpoint": "weights",
})

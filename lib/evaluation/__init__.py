"""Using trained models: metrics and the scoring loop, the baselines, sample grids, and a
trained prior as a diffusers pipeline."""

from lib import exports

# The names the scripts import from the package, and their modules.
__getattr__ = exports(__name__, {
    "gather_accumulator": "scoring", "gather_values": "scoring", "score_methods": "scoring",
    "save_samples": "images",
})

"""The networks and what they learn: the stage-1 VAE and discriminator with their loss, the
stage-2 prior with its objectives, and the VAE's latents as stage 2 sees them (cache included)."""

from lib import exports

# The names the scripts import from the package, and their modules.
__getattr__ = exports(__name__, {
    "VAEWithLogvar": "vae", "PatchDiscriminator": "vae", "build_discriminator": "vae",
    "count_parameters": "vae", "frozen": "vae",
    "discriminator_loss": "losses", "generator_loss": "losses", "load_perceptual": "losses",
    "reconstruction_map": "losses",
    "LatentPrior": "prior", "prior_files": "prior",
    "Objective": "objectives", "check_diffusion": "objectives", "generate_maps": "objectives",
    "make_objective": "objectives",
    "LatentCache": "latents", "LatentSource": "latents", "measure_latent_scale": "latents",
    "open_latent_cache": "latents", "place_vae": "latents",
})

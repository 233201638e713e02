"""Denoising Diffusion Probabilistic Models (Ho et al. 2020), with DDIM sampling (Song et al. 2021)
and a Fréchet-distance sample-quality measure that needs no downloaded weights."""

# First, before torch loads: a command interrupted while starting prints one line
# (transformer/training/errors.py).
import transformer.training  # noqa: F401

# isort: split
from .data import DaliError, ImageDataset, load_images, save_grid
from .diffusion import DiffusionConfig, GaussianDiffusion, cosine_betas, linear_betas
from .model import UNet, UNetConfig, timestep_embedding
from .pipeline import DDPM, ema_update, generate, load_ddpm
from .quality import Classifier, evaluate_samples, frechet_distance, train_classifier

__all__ = [
    "DDPM",
    "Classifier",
    "DaliError",
    "DiffusionConfig",
    "GaussianDiffusion",
    "ImageDataset",
    "UNet",
    "UNetConfig",
    "cosine_betas",
    "ema_update",
    "evaluate_samples",
    "frechet_distance",
    "generate",
    "linear_betas",
    "load_images",
    "load_ddpm",
    "save_grid",
    "timestep_embedding",
    "train_classifier",
]

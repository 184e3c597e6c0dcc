"""s2ft: spectral parameter-efficient fine-tuning (FourierFT and S2FT) for PyTorch and Hugging Face models."""

from s2ft.config import DCTConfig, FourierFTConfig, S2FTConfig, S2FTWaveletConfig, WaveletConfig, load_config
from s2ft.tuner.layers import SpectralLayer, SpectralLinear
from s2ft.tuner.model import SpectralModel, get_spectral_model

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "DCTConfig",
    "S2FTWaveletConfig",
    "WaveletConfig",
    "FourierFTConfig",
    "S2FTConfig",
    "SpectralLayer",
    "SpectralLinear",  # SpectralLayer's former name
    "SpectralModel",
    "get_spectral_model",
    "load_config",
]

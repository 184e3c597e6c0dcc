"""Pure tensor functions: spectrum locations, applying ΔW (dense and FFT), row/column ordering searches."""

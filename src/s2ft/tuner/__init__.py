"""The adapters on a model: layer kinds, injection and lifecycle, calibration, adapter files."""

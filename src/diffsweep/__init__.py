"""diffsweep: train diffusion models and compare noise schedules and samplers by FID."""
__version__ = "0.1.0"

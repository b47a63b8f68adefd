"""Benchmarks of trm_kernels and TRM against eager PyTorch and torch.compile: ``python -m trm_benchmarks.run``."""

"""Benchmarks: straightflow against a bare PyTorch loop and peer libraries."""

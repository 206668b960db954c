"""Triton kernels and their PyTorch references: paged decode attention and the decode GEMV. They
import nothing of the engine."""

"""Speed: decode and prefill against transformers and the weight-streaming floor, the kernels, the
paged store, tensor parallelism on paper, and the GPU diagnostics."""

"""Pure tensor functions: the gated delta rule, causal conv, rotary, attention, quantized matmuls, and the C
kernels (cpu/), each fast path beside the reference it is tested against."""

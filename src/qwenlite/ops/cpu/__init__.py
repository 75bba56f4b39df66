"""qwenlite's own C kernels: one source compiled on first use for this CPU, called through ctypes."""

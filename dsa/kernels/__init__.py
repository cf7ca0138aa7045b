"""Optional kernels behind the named backends of dsa/backends.py, each equal to dsa.core (the reference):
torch_paths.py (faster PyTorch), cpu_attention.py + cpu_kernels.cpp (C++, x86 AVX2), triton_attention.py (GPU).

    python -m dsa.kernels build     # compile the C++ kernels now (else on first use), and say where they are cached
"""

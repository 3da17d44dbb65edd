"""Small C++ kernels compiled on first use (torch.utils.cpp_extension) and registered as torch ops."""

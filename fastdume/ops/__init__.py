"""One entry per operation. Each picks its backend (Triton on CUDA, torch or C++ on the CPU),
checks its arguments and owns autograd. Model code calls these, never a kernel."""

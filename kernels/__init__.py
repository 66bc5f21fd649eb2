"""prefkern's Triton kernels and their typed launchers (installed as ``prefkern._kernels``).

Rules: tensors in, tensors out; launchers check device, dtype and shape and allocate outputs;
no autograd and nothing imported from prefkern. Public launchers run on their tensors' device
(``@on_tensor_device``, _device.py). This file and _device.py import no triton: the CUDA
backend (prefkern._cuda) reuses the guard.
"""

"""prefkern's Triton kernels and their typed launchers (installed as ``prefkern._kernels``).

Rules: tensors in, tensors out; launchers check device, dtype and shape and allocate outputs;
no autograd and nothing imported from prefkern.
"""

"""One module per op family: autograd Function + documented functional entry point."""

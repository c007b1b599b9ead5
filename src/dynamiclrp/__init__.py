"""dynamiclrp: Layer-wise Relevance Propagation over the autograd graph of any PyTorch model."""
__version__ = "0.1.0"

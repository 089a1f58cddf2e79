"""fastdume: training-free dynamic upcycling of dense experts into a Mixture-of-Experts."""

__version__ = "0.1.0"

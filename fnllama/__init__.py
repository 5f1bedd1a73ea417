"""fnllama: a JAX-style functional LLaMA trainer on PyTorch."""

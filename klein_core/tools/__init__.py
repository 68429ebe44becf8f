"""Tools around the core: the tiny offline Klein model factory, the generated sample dataset and the demo."""

"""DSPy engines served in-process: ``dspex/echo`` (placeholder) and ``dspex/local`` (llama.cpp).

Each is imported on its own; this package imports neither.
"""

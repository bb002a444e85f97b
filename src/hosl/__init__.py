"""hosl: Hybrid-Order Split Learning.

A language model is cut at layer k. The edge client trains its layers with zeroth-order
(forward-only, seeded-perturbation) estimates; the server trains the rest with backpropagation.
"""

__version__ = "0.1.0"

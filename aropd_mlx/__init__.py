"""aropd-mlx: Anchored Residual On-Policy Distillation (AR-OPD) with MLX.

The flow of one step (DESIGN.md): examples -> views -> rollout -> scoring -> objective -> update.
"""

__version__ = "0.1.0"

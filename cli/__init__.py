"""The `aropd-mlx` command line (packaged as aropd_mlx.cli)."""

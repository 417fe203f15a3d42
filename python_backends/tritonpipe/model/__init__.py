"""What runs inside Triton's Python stub: the generic model and the stage chain it runs.

Nothing here imports tritonclient or a TOML loader: the stub's environment only needs torch.
"""

"""Serving a bundle with NVIDIA Triton Inference Server: a model repository
whose Python-backend model runs fastertrt's runtime (`repository.py`, the model
itself in `triton_model.py`), and a local tritonserver for it (`server.py`)."""

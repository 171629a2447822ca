"""Pure-PyTorch models: a Llama-style decoder, scalar heads, generation, checkpoints, HF export.

Nothing in this package imports an orchestration or tracking library (prefect, mlflow, deepspeed, dvc)
or transformers; a test enforces that.
"""

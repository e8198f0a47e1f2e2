"""The command-line programs: train, evaluate, predict, export, compile_check, convert (weights).

Each module is one program's main. They are started through densenet_jax.launch, which prepares the process before
a module here is imported; train.py, evaluate.py, predict.py, the `python -m` forms and the console scripts are
one-line callers of it. The absl-based modules define their flags when imported, so one process imports one of
them.
"""

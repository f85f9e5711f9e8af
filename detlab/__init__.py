"""detlab: the lab beside the serving runtime (``multidet``): data generation, checkpoints, training,
evaluation, the archive builder, the TorchServe harness and the experiments. It uses the runtime; the
runtime never imports it (``make lint`` checks that), so a model archive and a Ray replica carry none of it.
"""

"""The shared process: a part of a chain (the steps before the model, or the whole chain) run for all of a model's
instances on a device.

An instance of a model with ``shared_process`` starts it (see :mod:`tritonpipe.model.shared_client`); it runs
beside the server, not inside a stub, and ends with the server.
"""

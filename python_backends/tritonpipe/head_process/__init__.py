"""The shared head process: the steps before a chain's last one, for all of a model's instances on a device.

An instance of a model with ``shared_head`` starts it (see :mod:`tritonpipe.model.shared_head`); it runs
beside the server, not inside a stub, and ends with the server.
"""

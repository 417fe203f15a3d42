"""Reading a served model's statistics once Triton has recorded the requests a test sent."""

from __future__ import annotations

import time

import tritonclient.grpc as grpcclient


def settled_statistics(server, model: str, inferences: int = 0, seconds: float = 10.0) -> dict:
    """The model's statistics (``model_stats[0]`` as JSON) once they count at least ``inferences`` inferences
    and, where they count any, an execution; or as they stand after ``seconds``.

    Triton records a batch's statistics after its responses are sent, so a client that has all its answers
    may still read counts without the last batch in them.
    """
    client = grpcclient.InferenceServerClient(server.grpc_url)
    deadline = time.monotonic() + seconds
    while True:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        counted, executed = int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
        settled = counted >= inferences and (counted == 0 or executed > 0)
        if settled or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)

"""Functions the tests in test_workers.py serve; the server imports this file by path."""

import os

import cv2
import torch


def report(data):
    """What the worker process sees: its torch and OpenCV threads, how many cores it may use, its pid."""
    return torch.tensor([torch.get_num_threads(), cv2.getNumThreads(), len(os.sched_getaffinity(0)), os.getpid()])


def picky(data: bytes):
    """The request's length; a request that starts with b"x" raises."""
    if data.startswith(b"x"):
        raise ValueError(f"refusing {len(data)} bytes that start with x")
    return torch.tensor([len(data)])

"""svd-batch: distributed batch rendering of Stable Video Diffusion on MindSpore and Ray."""

import os

# MindSpore 2.7.1 ships protos generated for protobuf 3; once ray has loaded protobuf's C++
# implementation they fail with "Descriptors cannot be created directly". The pure-python
# implementation accepts them. It has to be chosen before protobuf is first imported.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
# Weights are local by contract: no hub lookups, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"

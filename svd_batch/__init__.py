"""svd-batch: distributed batch rendering of Stable Video Diffusion on MindSpore and Ray."""

import os

# The environment every svd-batch process needs, this one and each Ray worker (the driver
# hands it to Ray's runtime env, so workers on other nodes get it too):
# - MindSpore 2.7.1 ships protos generated for protobuf 3; once ray has loaded protobuf's C++
#   implementation they fail with "Descriptors cannot be created directly". The pure-python
#   implementation accepts them. It has to be chosen before protobuf is first imported.
# - Weights are local by contract: no hub lookups, ever.
WORKER_ENV = {
    "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # transformers' advice that no torch is installed: by design, MindSpore runs the models.
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
for _name, _value in WORKER_ENV.items():
    os.environ.setdefault(_name, _value)
# Read when ray.data is first imported.
os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml"))

__version__ = "0.1.0"

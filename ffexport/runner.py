"""The Runner base: how every format's runtime is called. Imports nothing of the formats.

A raw Runner takes a 1x3xHxW float32 input (BGR minus mean) and returns (loc, conf, landmarks) as numpy
arrays shaped (1, N, 4), (1, N, 2), (1, N, 10). An end-to-end runner (`end_to_end = True`, an artifact
exported with --nms) takes the same input and returns (boxes (K, 4), scores (K,), landmarks (K, 10)) in
input-tensor pixels, already thresholded and suppressed.
"""
import numpy as np

OUTPUTS = ("loc", "conf", "landmarks")


class Runner:
    kind = "?"          # the format (or runtime) name
    input_size = None   # (H, W) for fixed-size artifacts, None when any size works
    multiple = None     # dynamic artifacts need H and W to be multiples of this
    model = None        # "v1"/"v2" when known
    path = None
    precision = "fp32"  # fp32 | fp16 | int8: decides the parity tolerances
    end_to_end = False  # True: outputs are detections (an --nms artifact), not raw anchors
    meta: dict = {}

    def __call__(self, x: np.ndarray):
        raise NotImplementedError

    def configure(self, conf=None, iou=None, max_det=None):
        """End-to-end artifacts whose thresholds are run-time inputs take them here; others ignore it."""

    def describe(self):
        size = "x".join(map(str, self.input_size)) if self.input_size else "dynamic"
        return f"{self.kind} {self.model or '?'} ({size}){' ' + str(self.path) if self.path else ''}"

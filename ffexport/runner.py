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
    tolerance = None    # a parity.TOLERANCES row other than the precision's (an NPU's fp16), None: the precision's
    end_to_end = False  # True: outputs are detections (an --nms artifact), not raw anchors
    landmarks = True    # False: an end-to-end file without landmarks (Core ML --vision): they come back (K, 0)
    meta: dict = {}

    def __call__(self, x: np.ndarray):
        raise NotImplementedError

    applied: dict = {}  # the thresholds the last configure() says apply (what callers print and record)

    def configure(self, conf=None, iou=None, max_det=None) -> dict:
        """Ask for thresholds; returns (and keeps in `applied`) the ones that will apply, which is what a
        caller prints. Raw outputs: the host applies what was asked. A static end-to-end file applies the
        ones baked at export (a stricter conf still filters, see ffexport.e2e.static_thresholds); ONNX,
        whose thresholds are inputs, overrides this."""
        from .e2e import static_thresholds

        self.applied = static_thresholds(self, conf, iou, max_det)
        return self.applied

    def describe(self):
        size = "x".join(map(str, self.input_size)) if self.input_size else "dynamic"
        return f"{self.kind} {self.model or '?'} ({size}){' ' + str(self.path) if self.path else ''}"

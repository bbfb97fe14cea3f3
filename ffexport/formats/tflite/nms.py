"""TFLite's in-graph NMS: litert-torch has no NMS lowering, so ffexport lowers its own op to the builtin."""
import numpy as np

_TFLITE_NMS_REGISTERED = []


def register_tflite_nms():
    """Teach litert-torch to lower `featherface::nms_padded` (models.e2e, EndToEnd(nms_op=True)) to TFLite's
    builtin NON_MAX_SUPPRESSION_V5. litert-torch has no NMS lowering of its own; its lowering registry
    takes one for any torch op, and a StableHLO custom call named after a tfl op becomes that op.
    Call before litert_torch.convert; idempotent."""
    if _TFLITE_NMS_REGISTERED:
        return
    from ffexport.models import e2e as _models_e2e  # noqa: F401  (defines the op)
    import torch
    from litert_torch.backend.experimental.torch_tfl._lowerings import _ir_operation
    from litert_torch.backend.lowerings import registry
    from litert_torch.backend.lowerings import utils as lowering_utils

    @registry.lower(torch.ops.featherface.nms_padded.default)
    def _lower(lctx, boxes, scores, max_out, iou, score):
        def const(v, dtype):
            return lowering_utils.numpy_array_constant(np.array(v, dtype=dtype))

        # Operands: boxes, scores, max_output_size, iou_threshold, score_threshold, soft_nms_sigma (0: hard).
        # The op reads boxes as [y1, x1, y2, x2]; x1, y1, x2, y2 gives the same IoU (axes swapped).
        return _ir_operation("tfl.non_max_suppression_v5", results=lowering_utils.node_meta_to_ir_types(lctx.node),
                             operands=[boxes, scores, const(max_out, np.int32), const(iou, np.float32),
                                       const(score, np.float32), const(0.0, np.float32)])

    _TFLITE_NMS_REGISTERED.append(True)

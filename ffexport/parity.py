"""Parity of an artifact against the PyTorch model: tensor level and detection level.

Small pure functions (as onnxruntime's quantization debug tools): compare tensors, match detections,
score them, then one driver that runs both over real images and checks documented tolerances.
"""
from dataclasses import dataclass, field

import numpy as np

from .measures import average_precision, box_iou, match, sqnr_db, tensor_errors  # noqa: F401 (parity's API)
from .runner import OUTPUTS

# Documented defaults (docs/parity.md): what an artifact of each precision must meet.
TOLERANCES = {
    "fp32": {"max_abs": {"loc": 1e-3, "conf": 1e-4, "landmarks": 2e-3}, "matched": 1.0, "ap": 0.99},
    "fp16": {"max_abs": {"conf": 2e-2}, "matched": 0.97, "ap": 0.97},
    "int8": {"max_abs": {}, "matched": 0.90, "ap": 0.95},
    # bf16 keeps 8 mantissa bits (fp16: 11): V2's conf moves by up to 9e-2 at 640x640 (OpenVINO bf16) while
    # 99% of detections match, so it is held at detection level.
    "bf16": {"max_abs": {}, "matched": 0.97, "ap": 0.97},
    # An NPU's fp16 (QNN HTP, RKNN) has no per-op precision choice: the DCN's sampling coordinates and the
    # softmax run in fp16 too. Measured in the vendors' simulators at 640x640 on the shared photos: conf moves
    # by up to 4.0e-2 (QNN) / 2.4e-2 (RKNN) with 100% / 99.3% of detections matched; held at detection
    # level (issue 23: >= 97% matched), like bf16.
    "fp16-npu": {"max_abs": {}, "matched": 0.97, "ap": 0.97},
    # --dcn fold / plain change the computation on purpose (their AP cost is measured and printed at
    # export): parity then says how far the detections moved from the exact model, with a loose floor.
    "approximation": {"max_abs": {}, "matched": 0.85, "ap": 0.85},
    # --dcn taps is exact while the offsets stay within its window and clamps the rare larger ones (V2 at 640x640:
    # conf SQNR 36 dB, 71/71 detections matched on 16 held-out images, AP 91.50/87.06/60.41 vs 91.52/87.04/60.32
    # exact on 366): held at detection level, like an NPU's fp16.
    "taps": {"max_abs": {}, "matched": 0.97, "ap": 0.97},
}


def tolerance_class(runner) -> str:
    """Which TOLERANCES row an artifact is held to: its precision, `approximation` for a DCN fold/plain, `taps`
    for an fp32 taps-form file (lower precisions: their own, looser rows)."""
    meta = getattr(runner, "meta", None) or {}
    if meta.get("dcn") in ("fold", "plain"):
        return "approximation"
    if meta.get("dcn") == "taps" and getattr(runner, "precision", "fp32") == "fp32":
        return "taps"
    if getattr(runner, "tolerance", None) in TOLERANCES:
        return runner.tolerance
    return getattr(runner, "precision", "fp32") if getattr(runner, "precision", "fp32") in TOLERANCES else "int8"


E2E_LANDMARKS_PX = 0.5  # an fp32 --nms artifact's landmarks vs PyTorch + host decoding, input pixels


@dataclass
class ParityReport:
    artifact: str
    precision: str
    images: int = 0
    tensors: dict = field(default_factory=dict)      # output -> {max_abs, mean_abs, cosine, sqnr_db}
    detections: dict = field(default_factory=dict)   # matched, ref_count, count, score_delta_*, ap
    tolerances: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    evaluation: str = ""  # how the artifact was run when not by its real runtime (e.g. a reference evaluator)
    thresholds: dict = field(default_factory=dict)   # conf/iou/max_det both sides were decoded at
    baked: bool = False                              # thresholds set by the file (--nms, static), not asked

    @property
    def ok(self):
        return not self.failures

    def to_json(self):
        return {"artifact": self.artifact, "precision": self.precision, "images": self.images,
                "tensors": self.tensors, "detections": self.detections, "tolerances": self.tolerances,
                "thresholds": self.thresholds, "thresholds_from_file": self.baked,
                "passed": self.ok, "failures": self.failures,
                **({"evaluation": self.evaluation} if self.evaluation else {})}

    def summary(self) -> str:
        t = self.thresholds
        at = (f"conf {t['conf']:g}, nms {t['iou']:g}" + (f", max {t['max_det']} faces" if t.get("max_det") else "")
              if t else "")
        lines = [f"parity of {self.artifact} ({self.precision}) vs PyTorch on {self.images} images"
                 + (f", both at {at}" + (" (the file's in-graph thresholds)" if self.baked else "") if at else "")
                 + (f" — {self.evaluation}" if self.evaluation else "")]
        for k, t in self.tensors.items():
            lines.append(f"  {k:<10} max|d| {t['max_abs']:.3g}  mean|d| {t['mean_abs']:.3g}  cos {t['cosine']:.6f}"
                         f"  SQNR {t['sqnr_db']:.1f} dB")
        d = self.detections
        if not d.get("ref_count"):  # nothing to match: no made-up percentages
            lines.append(f"  detections: {d.get('count', 0)} vs 0 (PyTorch): nothing to match")
            lines.append("  PASS" if self.ok else "  FAIL: " + "; ".join(self.failures))
            return "\n".join(lines)
        landmarks = ("landmarks: none in this file" if d.get("landmarks_max_px", 0) is None else
                     f"landmarks max {d.get('landmarks_max_px', 0):.2g} px")
        lines.append(f"  detections: {d['count']} vs {d['ref_count']} (PyTorch); matched {d['matched']:.1%} at "
                     f"IoU>={d.get('match_iou', 0.5)}; {landmarks};"
                     f" score delta mean {d['score_delta_mean']:.2g} max {d['score_delta_max']:.2g};"
                     f" AP vs PyTorch {d['ap']:.4f}")
        lines.append("  PASS" if self.ok else "  FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


def compare(ref_runner, runner, images, conf=0.5, nms=0.4, precision="fp32", progress=True) -> ParityReport:
    """Run both runners on the same inputs (the artifact's input size) and compare."""
    from tqdm import tqdm

    from ffexport.models.postprocess import detect
    from ffexport.models.preprocess import prepare

    from .runtime import decode
    from ffexport.images import read_image

    report = ParityReport(str(getattr(runner, "path", runner.kind)), precision, tolerances=TOLERANCES[precision],
                          evaluation=getattr(runner, "evaluation", ""))
    acc = {k: {"ref": [], "got": []} for k in OUTPUTS}
    stats = {"max_abs": {k: 0.0 for k in OUTPUTS}, "sum_abs": {k: 0.0 for k in OUTPUTS}, "n": {k: 0 for k in OUTPUTS}}
    ref_total, count, tp_all, scores_all, deltas = 0, 0, [], [], []
    iou = 0.9 if runner.end_to_end and precision == "fp32" else 0.5
    # Both sides at the thresholds the artifact applies: a static --nms file decides its own (baked).
    from .e2e import threshold_gaps

    conf0, nms0 = conf, nms
    applied = runner.configure(conf, nms)
    conf, nms = applied["conf"], applied["iou"]
    top_k = applied.get("max_det") or 750
    report.thresholds = {"conf": conf, "iou": nms, "max_det": applied.get("max_det")}
    report.baked = bool(threshold_gaps({"conf": conf0, "iou": nms0}, applied))
    lm_err = 0.0
    for path in tqdm(images, desc="parity", unit="img", disable=None if progress else True):
        x, scale = prepare(read_image(path), runner.input_size, runner.multiple or 32)
        ref_out, out = ref_runner(x), runner(x)
        if not runner.end_to_end:  # an --nms artifact has no raw tensors: it is compared by its detections
            for k, r, g in zip(OUTPUTS, ref_out, out):
                d = np.abs(np.asarray(r, np.float64) - np.asarray(g, np.float64))
                stats["max_abs"][k] = max(stats["max_abs"][k], float(d.max()))
                stats["sum_abs"][k] += float(d.sum())
                stats["n"][k] += d.size
                # Subsample for cosine/SQNR so memory stays flat over many images.
                acc[k]["ref"].append(np.asarray(r).ravel()[::7])
                acc[k]["got"].append(np.asarray(g).ravel()[::7])
        dref = detect(*(o[0] for o in ref_out), x.shape[2:], scale, conf, nms, keep_top_k=top_k)
        dgot = decode(runner, out, x.shape[2:], scale, conf, nms)
        pairs, tp = match(dref.boxes, dgot.boxes, dgot.scores, iou)
        if pairs and runner.landmarks:  # landmark error in input-tensor pixels
            i, j = np.array(pairs).T
            lm_err = max(lm_err, float(np.abs(dgot.landmarks[i] - dref.landmarks[j]).max() * scale))
        ref_total += len(dref)
        count += len(dgot)
        tp_all.append(tp)
        scores_all.append(dgot.scores)
        deltas += [abs(float(dgot.scores[i] - dref.scores[j])) for i, j in pairs]
    report.images = len(images)
    for k in OUTPUTS if not runner.end_to_end else ():
        ref, got = np.concatenate(acc[k]["ref"]), np.concatenate(acc[k]["got"])
        t = tensor_errors(ref, got)
        t["max_abs"] = stats["max_abs"][k]
        t["mean_abs"] = stats["sum_abs"][k] / max(stats["n"][k], 1)
        t["sqnr_db"] = sqnr_db(ref, got)
        report.tensors[k] = t
    tp, scores = np.concatenate(tp_all), np.concatenate(scores_all)
    report.detections = {"ref_count": ref_total, "count": count, "matched": float(tp.sum() / max(ref_total, 1)),
                         "score_delta_mean": float(np.mean(deltas)) if deltas else 0.0,
                         "score_delta_max": float(np.max(deltas)) if deltas else 0.0,
                         "ap": average_precision(tp, scores, ref_total), "match_iou": iou,
                         "landmarks_max_px": lm_err if runner.landmarks else None}
    tol = TOLERANCES[precision]
    if ref_total == 0:  # 0 vs 0 would "match": say that nothing was compared
        report.failures.append(f"PyTorch finds no face above conf {conf:g} in these {len(images)} images, so no "
                               f"detection was compared: use images with faces, or a lower --conf (a static "
                               f"--nms file: re-export with one)")
        return report
    for k, limit in tol["max_abs"].items():
        if k in report.tensors and report.tensors[k]["max_abs"] > limit:
            report.failures.append(f"{k} max abs error {report.tensors[k]['max_abs']:.3g} > {limit:g}")
    if report.detections["matched"] < tol["matched"]:
        report.failures.append(f"matched {report.detections['matched']:.1%} < {tol['matched']:.0%}")
    if runner.end_to_end and precision == "fp32":  # docs/artifact-contract.md: --nms artifacts, fp32
        if runner.landmarks and lm_err > E2E_LANDMARKS_PX:
            report.failures.append(f"landmarks differ by {lm_err:.2g} px > {E2E_LANDMARKS_PX} px")
        if abs(count - ref_total) > 0.01 * max(ref_total, 1):
            report.failures.append(f"{count} detections vs {ref_total} (PyTorch): more than 1% apart")
    if report.detections["ap"] < tol["ap"]:
        report.failures.append(f"AP vs PyTorch {report.detections['ap']:.4f} < {tol['ap']}")
    return report

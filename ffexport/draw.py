"""Draw detections on an image (for --draw and for looking at results)."""
import cv2
import numpy as np

from ffexport.models.postprocess import Detections


def draw(img: np.ndarray, dets: Detections) -> np.ndarray:
    out = img.copy()
    thick = max(1, round(max(img.shape[:2]) / 500))
    for box, score, lm in zip(dets.boxes, dets.scores, dets.landmarks):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 255, 0), thick)
        cv2.putText(out, f"{score:.2f}", (x1, max(0, y1 - 2)), cv2.FONT_HERSHEY_SIMPLEX, 0.3 * thick,
                    (0, 255, 255), 1)
        # (K, 0) landmarks (a file without them): no points
        colours = [(0, 0, 255), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 0, 0)][:len(lm) // 2]
        for i, color in enumerate(colours):
            cv2.circle(out, (int(lm[2 * i]), int(lm[2 * i + 1])), thick, color, -1)
    return out

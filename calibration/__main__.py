"""Regenerate manifest.json: python -m calibration WIDERFACE_ROOT"""
import json
import sys

from . import MANIFEST, make_manifest

images = make_manifest(sys.argv[1])
MANIFEST.write_text(json.dumps({"source": "WIDER FACE val, 2 images per event, seed 0 "
                                          "(python -m calibration WIDERFACE_ROOT)", "images": images}, indent=1) + "\n")
print(f"wrote {MANIFEST} ({len(images)} images)")

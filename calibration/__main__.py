"""Regenerate manifest.json from a WIDER FACE folder: python -m ffexport.calibration WIDERFACE_ROOT"""
import sys

from . import MANIFEST, write_manifest

if len(sys.argv) != 2:
    sys.exit(__doc__)
images = write_manifest(sys.argv[1])
print(f"wrote {MANIFEST} ({len(images)} images)")

"""The `ffexport` command: a thin click layer over the library. Errors print as one line."""
import functools
import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import FFExportError


def user_errors(fn):
    """Turn FFExportError into 'error: <one line>' and its exit status, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FFExportError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def parse_size(value):
    """'640x640' or '640' -> (640, 640); both sides multiples of 32."""
    if value is None:
        return None
    try:
        parts = [int(v) for v in str(value).lower().split("x")]
        h, w = parts if len(parts) == 2 else parts * 2
    except ValueError:
        raise FFExportError(f"input size {value!r} is not HxW (e.g. 640x640)") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise FFExportError(f"input size {value} must be positive multiples of 32 (the model downsamples by 32): "
                            f"try {max(32, round(h / 32) * 32)}x{max(32, round(w / 32) * 32)}")
    return h, w


def write_json(path, obj):
    from .cache import atomic_output

    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1))


model_option = click.option("--model", "model", type=click.Choice(["v1", "v2"]), default="v2", show_default=True,
                            help="FeatherFace variant.")
weights_option = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                              help="Checkpoint path (default: the published one, see README).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ffexport")
def main():
    """Export, quantize, verify and benchmark FeatherFace face detectors."""


@main.command()
@click.argument("image", type=click.Path())
@model_option
@weights_option
@click.option("--artifact", type=click.Path(), default=None,
              help="Run an exported .onnx/.pt/.tflite/.mlpackage instead of the PyTorch model.")
@click.option("--conf", default=0.5, show_default=True, help="Score threshold.")
@click.option("--nms", default=0.4, show_default=True, help="NMS IoU threshold.")
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write detections as JSON.")
@click.option("--draw", "draw_out", type=click.Path(), default=None, help="Write the image with boxes.")
@user_errors
def detect(image, model, weights, artifact, conf, nms, json_out, draw_out):
    """Detect faces in IMAGE at its own resolution (fixed-size artifacts: letterboxed)."""
    from models.preprocess import read_image

    from .runtime import detections_json, load_runner, run_image

    if artifact is None and image.lower().endswith((".onnx", ".pt", ".tflite", ".mlpackage")):
        raise FFExportError(f"{image} looks like a model, not an image: use --artifact {image} IMAGE")
    if draw_out and Path(draw_out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
        raise FFExportError(f"cannot write {draw_out}: use a .png or .jpg path for --draw")
    img = read_image(image)
    runner = load_runner(artifact, model, weights)
    dets = run_image(runner, img, conf, nms)
    result = detections_json(image, runner.model or model, dets, {"runtime": runner.kind})
    if json_out:
        write_json(json_out, result)
    if draw_out:
        import cv2

        from .cache import atomic_output
        from .draw import draw

        with atomic_output(draw_out) as tmp:
            if not cv2.imwrite(str(tmp), draw(img, dets)):
                raise FFExportError(f"cannot write {draw_out}: use a .png or .jpg path")
    click.echo(f"{len(dets)} faces in {image} ({runner.describe()}, conf {conf}, nms {nms})", err=True)
    if not (json_out or draw_out):
        click.echo(json.dumps(result))

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


def _default_out(model, suffix, tag=""):
    return f"featherface_{model}{tag}{suffix}"


size_option = click.option("--input-size", default="640x640", show_default=True, help="HxW, multiples of 32.")


@main.command()
@model_option
@weights_option
@size_option
@click.option("--dcn", type=click.Choice(["grid", "gather"]), default="grid", show_default=True,
              help="Deformable-conv decomposition.")
@click.option("-o", "--output", default=None, help="Output .pt (default featherface_<model>.pt).")
@user_errors
def torchscript(model, weights, input_size, dcn, output):
    """Export a traced, frozen TorchScript module."""
    from .export_torchscript import export_torchscript
    from .weights import load_model

    size = parse_size(input_size)
    export_torchscript(load_model(model, weights), model, output or _default_out(model, ".pt"), size, dcn)


@main.command()
@model_option
@weights_option
@size_option
@click.option("--dynamic", is_flag=True, help="Dynamic batch/H/W (any multiple of 32).")
@click.option("--opset", default=19, show_default=True, type=int)
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--dcn", type=click.Choice(["auto", "native", "grid", "gather"]), default="auto", show_default=True,
              help="auto: ONNX DeformConv if onnxruntime runs it, else grid_sample decomposition.")
@click.option("--quantize", type=click.Choice(["int8", "fp16"]), default=None, help="Post-training quantization.")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration images (WIDER FACE tree or any folder); default: WIDER FACE, see README.")
@click.option("--calib-size", default=100, show_default=True, help="Number of calibration images.")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True)
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight quantization granularity.")
@click.option("-o", "--output", default=None, help="Output .onnx (default featherface_<model>[_int8].onnx).")
@user_errors
def onnx(model, weights, input_size, dynamic, opset, no_simplify, dcn, quantize, calib, calib_size, calib_method,
         per_channel, output):
    """Export to ONNX (simplified, with metadata), optionally quantized."""
    from .export_onnx import export_onnx
    from .weights import load_model

    size = parse_size(input_size)
    out = output or _default_out(model, ".onnx", f"_{quantize}" if quantize else "")
    if quantize is None:
        export_onnx(load_model(model, weights), model, out, size, dynamic, opset, dcn, not no_simplify)
        return
    from .quantize import quantize_onnx

    quantize_onnx(load_model(model, weights), model, out, size, quantize, dynamic=dynamic, opset=opset, dcn=dcn,
                  calib=calib, calib_size=calib_size, method=calib_method, per_channel=per_channel)


def _images_in(folder, limit):
    from .errors import FFExportError

    folder = Path(folder)
    if not folder.is_dir():
        raise FFExportError(f"image folder {folder} does not exist: pass --images DIR")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
    if not files:
        raise FFExportError(f"no .jpg/.png images under {folder}: pass --images DIR with images")
    step = max(1, len(files) // limit)
    return files[::step][:limit]


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--images", type=click.Path(), default=None,
              help="Folder of real images (default: WIDER FACE evaluation images, calibration images excluded).")
@click.option("--limit", default=16, show_default=True, help="At most this many images.")
@weights_option
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the report as JSON.")
@click.option("--conf", default=0.5, show_default=True)
@user_errors
def parity(artifact, images, limit, weights, json_out, conf):
    """Compare ARTIFACT with the PyTorch model on real images (exit 1 if beyond tolerance)."""
    from .parity import compare
    from .runtime import TorchRunner, load_runner
    from .weights import load_model

    runner = load_runner(artifact)
    if runner.model not in ("v1", "v2"):
        raise FFExportError(f"{artifact} carries no ffexport model metadata: re-export it with ffexport")
    if images is None:
        from .widerface import evaluation_images, find_widerface_root

        files = evaluation_images(find_widerface_root(None), limit)
    else:
        files = _images_in(images, limit)
    ref = TorchRunner(load_model(runner.model, weights), runner.model)
    report = compare(ref, runner, files, conf=conf, precision=getattr(runner, "precision", "fp32"))
    click.echo(report.summary())
    if json_out:
        write_json(json_out, report.to_json())
    sys.exit(0 if report.ok else 1)

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
@click.option("--dcn", type=click.Choice(["auto", "native", "grid", "gather", "rows"]), default="auto",
              show_default=True, help="auto: ONNX DeformConv if onnxruntime runs it, else grid_sample "
                                      "decomposition. Speeds of each form: benchmarks/RESULTS.md.")
@click.option("--quantize", type=click.Choice(["int8", "fp16"]), default=None, help="Post-training quantization.")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration images (WIDER FACE tree or any folder); default: WIDER FACE, see README.")
@click.option("--calib-size", default=100, show_default=True, help="Number of calibration images.")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="percentile",
              show_default=True)
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight quantization granularity.")
@click.option("--target-db", default=50.0, show_default=True,
              help="int8: keep the worst convs in float until the conf output reaches this SQNR on calibration "
                   "images. Lower keeps more convs int8 (smaller file, less faithful); see README.")
@click.option("-o", "--output", default=None, help="Output .onnx (default featherface_<model>[_int8].onnx).")
@user_errors
def onnx(model, weights, input_size, dynamic, opset, no_simplify, dcn, quantize, calib, calib_size, calib_method,
         per_channel, target_db, output):
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
                  calib=calib, calib_size=calib_size, method=calib_method, per_channel=per_channel,
                  target_db=target_db)


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
        import os

        from .evaluate import evaluation_keys

        root = os.environ.get("FFEXPORT_WIDERFACE")
        if not root:
            raise FFExportError("no images to compare on: pass --images DIR or set FFEXPORT_WIDERFACE")
        files = [p for _, p in evaluation_keys(root, limit)]
    else:
        files = _images_in(images, limit)
    ref = TorchRunner(load_model(runner.model, weights), runner.model)
    report = compare(ref, runner, files, conf=conf, precision=getattr(runner, "precision", "fp32"))
    click.echo(report.summary())
    if json_out:
        write_json(json_out, report.to_json())
    sys.exit(0 if report.ok else 1)


@main.command(name="eval")
@click.argument("artifact", type=click.Path(), required=False)
@model_option
@weights_option
@click.option("--widerface", type=click.Path(), default=None,
              help="WIDER FACE root (WIDER_val/images + ground_truth/*.mat); default $FFEXPORT_WIDERFACE.")
@click.option("--limit", type=int, default=None, help="Evaluate at most N images (stratified), for a quick look.")
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--preds-dir", type=click.Path(), default=None, help="Also write per-image WIDER FACE txt predictions.")
@click.option("--dcn", type=click.Choice(["grid", "plain"]), default="grid", show_default=True,
              help="PyTorch model only: 'plain' measures the AP cost of dropping the deformable offsets.")
@user_errors
def eval_(artifact, model, weights, widerface, limit, json_out, preds_dir, dcn):
    """WIDER FACE Easy/Medium/Hard AP (official protocol) of ARTIFACT, or of the PyTorch model."""
    import os

    from .evaluate import evaluate_runner, format_result
    from .runtime import load_runner

    root = widerface or os.environ.get("FFEXPORT_WIDERFACE")
    if not root:
        raise FFExportError("no WIDER FACE folder: pass --widerface DIR or set FFEXPORT_WIDERFACE")
    runner = load_runner(artifact, model, weights, dcn=dcn)
    result = evaluate_runner(runner, root, limit, preds_dir)
    result["dcn"] = dcn if artifact is None else "as exported"
    click.echo(format_result(result))
    if json_out:
        write_json(json_out, result)


def _split(value, parse=str):
    return [parse(v.strip()) for v in str(value).split(",") if v.strip()]


@main.command()
@click.option("--target", "targets", default="torch,onnxruntime,onnxruntime-int8", show_default=True,
              help="Comma-separated targets (see README), or 'all'.")
@click.option("--model", "models", default="v1,v2", show_default=True)
@click.option("--input-size", "sizes", default="640x640", show_default=True, help="Comma-separated HxW.")
@click.option("--threads", default="1", show_default=True, help="Comma-separated thread counts.")
@click.option("--runs", default=100, show_default=True)
@click.option("--warmup", default=10, show_default=True)
@click.option("--remote", default=None, help="onnxruntime-arm: user@host[:port] of an ARM board reachable by ssh.")
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--plot", "plot_out", type=click.Path(), default=None, help="PNG of latency per target, V1 vs V2.")
@user_errors
def bench(targets, models, sizes, threads, runs, warmup, remote, json_out, plot_out):
    """Latency per target, V1 and V2 interleaved, with the V2/V1 ratio and a verdict on the '2x' claim."""
    import os

    from . import bench as B
    from .targets import TARGETS

    names = list(TARGETS) if targets == "all" else _split(targets)
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise FFExportError(f"unsupported target {', '.join(unknown)}: choose from {', '.join(TARGETS)}")
    models = _split(models)
    if not models or any(m not in ("v1", "v2") for m in models):
        raise FFExportError(f"--model takes v1, v2 or v1,v2 (got {','.join(models)})")
    if runs < 1 or warmup < 0:
        raise FFExportError("--runs must be >= 1 and --warmup >= 0")
    size_list = [parse_size(s) for s in _split(sizes)]
    thread_list = _split(threads, int)
    if remote:
        os.environ["FFEXPORT_ARM_REMOTE"] = remote
    result = B.bench(names, models, size_list, thread_list, runs, warmup,
                     progress=lambda m: click.echo(m, err=True))
    click.echo(B.table(result))
    click.echo("\n" + B.verdict(result))
    result["ratios"], result["verdict"] = B.ratios(result), B.verdict(result)
    if json_out:
        write_json(json_out, result)
    if plot_out:
        B.plot(result, plot_out)


@main.command()
@model_option
@weights_option
@size_option
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True)
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="int8 weights (per-channel linear).")
@click.option("--calib", type=click.Path(), default=None, help="Calibration images (activation quantization, macOS).")
@click.option("--calib-size", default=100, show_default=True)
@click.option("--input-type", type=click.Choice(["image", "tensor"]), default="image", show_default=True)
@click.option("--dcn", type=click.Choice(["grid", "gather", "plain"]), default="grid", show_default=True,
              help="plain = regular conv without offsets: an approximation, see README for its AP cost.")
@click.option("-o", "--output", default=None, help="Output .mlpackage (default featherface_<model>.mlpackage).")
@user_errors
def coreml(model, weights, input_size, precision, quantize, calib, calib_size, input_type, dcn, output):
    """Export a Core ML ML Program (iOS 16+/macOS 13+)."""
    from .export_coreml import export_coreml
    from .weights import load_model

    if dcn == "plain":
        _warn_plain()
    export_coreml(load_model(model, weights), model, output or _default_out(model, ".mlpackage"),
                  parse_size(input_size), precision, quantize, calib, calib_size, input_type, dcn)


@main.command()
@model_option
@weights_option
@size_option
@click.option("--quantize", type=click.Choice(["int8", "fp16"]), default=None)
@click.option("--calib", type=click.Path(), default=None)
@click.option("--calib-size", default=100, show_default=True)
@click.option("--dcn", type=click.Choice(["rows", "grid", "gather", "plain"]), default="rows", show_default=True,
              help="rows = exact DCN as a row gather + FULLY_CONNECTED (fast); grid/gather = exact but ~20x "
                   "slower in TFLite; plain = regular conv without offsets: an approximation, see README.")
@click.option("-o", "--output", default=None, help="Output .tflite (default featherface_<model>[_int8].tflite).")
@user_errors
def tflite(model, weights, input_size, quantize, calib, calib_size, dcn, output):
    """Export a TFLite flatbuffer (fp32, fp16 weights or full-integer int8)."""
    from .export_tflite import export_tflite
    from .weights import load_model

    if dcn == "plain":
        _warn_plain()
    out = output or _default_out(model, ".tflite", f"_{quantize}" if quantize else "")
    export_tflite(load_model(model, weights), model, out, parse_size(input_size), quantize, calib, calib_size, dcn)


def _warn_plain():
    from .plain_cost import PLAIN_DCN_COST

    click.echo(f"warning: --dcn plain drops the deformable offsets: {PLAIN_DCN_COST}", err=True)

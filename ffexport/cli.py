"""The `ffexport` command: a thin click layer over the library.

Export commands are generated from the formats table (ffexport/formats): each format's command, its
--dcn/--precision/--quantize choices and its own options come from its `Format`. Every error is one line
(`error: <problem>: <fix>`) and a non-zero status; SIGTERM is handled like SIGINT; every temporary file
of a run lives in one per-run folder that is always removed.
"""
import functools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import click

from . import __version__
from .errors import FFExportError

EXIT_INTERRUPTED = 130


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so every `finally` (temp files, staging folders) runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def user_errors(fn):
    """One line for every way a command can fail; a traceback only with --verbose / FFEXPORT_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .log import set_verbose, verbose

        set_verbose(kwargs.pop("verbose", False))
        run_tmp = tempfile.mkdtemp(prefix="ffexport-run-")
        # Every tempfile of this run (ours and the libraries': quantizer, converters) goes in one folder.
        tempfile.tempdir, previous = run_tmp, tempfile.tempdir
        try:
            return fn(*args, **kwargs)
        except FFExportError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except (KeyboardInterrupt, Terminated) as e:
            click.echo("error: interrupted: nothing was written (run the command again)", err=True)
            sys.exit(EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else 128 + signal.SIGTERM)
        except MemoryError:
            click.echo("error: out of memory: use a smaller --input-size, fewer "
                       "images, or a machine with more memory", err=True)
            sys.exit(1)
        except Exception as e:  # the net, not the fix: each known failure has its own check and message
            if verbose():
                import traceback

                traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            ctx = click.get_current_context(silent=True)
            click.echo(f"error: internal error in {ctx.info_name if ctx else 'ffexport'}: {type(e).__name__}: {first} — "
                       f"please report it (run with --verbose for the traceback)", err=True)
            sys.exit(1)
        finally:
            tempfile.tempdir = previous
            shutil.rmtree(run_tmp, ignore_errors=True)

    return click.option("--verbose", is_flag=True, help="Show library output and tracebacks.")(wrapper)


class Finite(click.ParamType):
    """A float in [lo, hi] (never nan or inf)."""

    name = "float"

    def __init__(self, lo=None, hi=None):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            self.fail(f"{value} is not a number in [{self.lo}, {self.hi}]", param, ctx)
        return v


def write_json(path, obj):
    from .cache import atomic_output

    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1))


def _model_names():
    from ffexport.models import MODELS

    return list(MODELS)


def model_option(fn):
    return click.option("--model", "model", type=click.Choice(_model_names()), default="v2", show_default=True,
                        help="FeatherFace variant.")(fn)


weights_option = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                              help="Checkpoint path (default: the published one, see docs/formats.md).")
size_option = click.option("--input-size", default="640x640", show_default=True, help="HxW, multiples of 32.")
conf_option = click.option("--conf", type=Finite(0, 1), default=0.5, show_default=True, help="Score threshold.")
nms_option = click.option("--nms", type=Finite(0, 1), default=0.4, show_default=True, help="NMS IoU threshold.")


def _runtime_names():
    from .formats import FORMATS

    return [f.name for f in FORMATS if f.runner]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ffexport")
def cli():
    """Export, quantize, verify and benchmark FeatherFace face detectors."""


def main(argv=None):
    """Entry point: click's own usage errors become one line too."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="ffexport", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError:
        sys.exit(0)
    except click.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "ffexport"
        click.echo(f"error: {e.format_message()}: see '{cmd} --help'", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("error: interrupted: nothing was written (run the command again)", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)


def _explicit(ctx, *names):
    from click.core import ParameterSource

    return [n for n in names if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)]


# ---- detect / parity / eval: any artifact, through the formats table ----

@cli.command()
@click.argument("image", type=click.Path())
@model_option
@weights_option
@click.option("--artifact", type=click.Path(), default=None,
              help="Run an exported file (any format in the table) instead of the PyTorch model.")
@click.option("--runtime", type=click.Choice(_runtime_names()), default=None,
              help="Run the artifact with this runtime (e.g. opencv for an .onnx); default: by its suffix.")
@conf_option
@nms_option
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write detections as JSON.")
@click.option("--draw", "draw_out", type=click.Path(), default=None, help="Write the image with boxes.")
@user_errors
@click.pass_context
def detect(ctx, image, model, weights, artifact, runtime, conf, nms, json_out, draw_out):
    """Detect faces in IMAGE at its own resolution (fixed-size artifacts: letterboxed)."""
    from . import formats
    from .exporter import check_writable
    from .images import read_image
    from .runtime import detections_json, load_runner, run_image

    if artifact is None and any(image.lower().endswith(s) for f in formats.FORMATS for s in f.suffixes):
        raise FFExportError(f"{image} looks like a model, not an image: use --artifact {image} IMAGE")
    if artifact is not None and _explicit(ctx, "model", "weights"):
        raise FFExportError("--model/--weights choose the PyTorch model, but --artifact is given: drop one of them")
    if draw_out and Path(draw_out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
        raise FFExportError(f"cannot write {draw_out}: use a .png or .jpg path for --draw")
    for path, opt in ((json_out, "--json"), (draw_out, "--draw")):
        if path:
            check_writable(path, opt, inputs=(image, artifact, weights))
    if json_out and draw_out and Path(json_out).resolve() == Path(draw_out).resolve():
        raise FFExportError("--json and --draw name the same file: give them different paths")
    img = read_image(image)
    runner = load_runner(artifact, model, weights, runtime=runtime)
    dets = run_image(runner, img, conf, nms)
    applied = _applied_thresholds(runner, conf, nms, explicit=_explicit(ctx, "conf", "nms"))
    result = detections_json(image, runner.model or model, dets,
                             {"runtime": runner.kind, "conf": applied["conf"], "nms": applied["iou"]})
    if json_out:
        write_json(json_out, result)
    if draw_out:
        import cv2

        from .cache import atomic_output
        from .draw import draw

        with atomic_output(draw_out) as tmp:
            if not cv2.imwrite(str(tmp), draw(img, dets)):
                raise FFExportError(f"cannot write {draw_out}: use a .png or .jpg path")
    click.echo(f"{len(dets)} faces in {image} ({runner.describe()}, conf {applied['conf']:g}, "
               f"nms {applied['iou']:g})", err=True)
    if not (json_out or draw_out):
        click.echo(json.dumps(result))


def _applied_thresholds(runner, conf, iou, explicit=()) -> dict:
    """The thresholds `runner` applies for the asked conf/iou, with a warning for each asked value an --nms
    file cannot honour (its thresholds are baked), so no printed value is one that was not applied."""
    from .e2e import reexport_hint, threshold_gaps

    applied = runner.applied or runner.configure(conf, iou)
    asked = {"conf": conf if "conf" in explicit else None, "iou": iou if "nms" in explicit else None}
    gaps = threshold_gaps(asked, applied)
    if gaps:
        click.echo(f"warning: {Path(str(runner.path)).name}: {'; '.join(gaps)}: "
                   f"{reexport_hint(runner, conf=asked['conf'], iou=asked['iou'])}", err=True)
    return applied


def _default_images(limit):
    from .evaluate import evaluation_keys

    root = os.environ.get("FFEXPORT_WIDERFACE")
    if not root:
        raise FFExportError("no images to compare on: pass --images DIR or set FFEXPORT_WIDERFACE")
    return [p for _, p in evaluation_keys(root, limit)]


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--images", type=click.Path(), default=None,
              help="Folder of real images (default: WIDER FACE evaluation images, calibration images excluded).")
@click.option("--limit", type=click.IntRange(min=1), default=16, show_default=True, help="At most this many images.")
@click.option("--runtime", type=click.Choice(_runtime_names()), default=None,
              help="Run the artifact with this runtime (e.g. opencv for an .onnx); default: by its suffix.")
@weights_option
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the report as JSON.")
@conf_option
@user_errors
@click.pass_context
def parity(ctx, artifact, images, limit, runtime, weights, json_out, conf):
    """Compare ARTIFACT with the PyTorch model on real images (exit 1 if beyond tolerance)."""
    from ffexport.models import MODELS

    from .exporter import check_writable
    from .formats.pytorch import TorchRunner
    from .images import list_images, spread
    from .parity import compare, tolerance_class
    from .runtime import load_runner
    from .weights import load_model

    if json_out:
        check_writable(json_out, "--json", inputs=(artifact, weights))
    runner = load_runner(artifact, runtime=runtime)
    if runner.model not in MODELS:
        raise FFExportError(f"{artifact} carries no ffexport model metadata: re-export it with ffexport")
    files = _default_images(limit) if images is None else spread(list_images(images), limit)
    ref = TorchRunner(load_model(runner.model, weights), runner.model)
    runner.configure(conf, 0.4)
    _applied_thresholds(runner, conf, 0.4, explicit=_explicit(ctx, "conf"))
    report = compare(ref, runner, files, conf=conf, precision=tolerance_class(runner))
    click.echo(report.summary())
    if json_out:
        write_json(json_out, report.to_json())
    sys.exit(0 if report.ok else 1)


@cli.command(name="eval")
@click.argument("artifact", type=click.Path(), required=False)
@model_option
@weights_option
@click.option("--runtime", type=click.Choice(_runtime_names()), default=None,
              help="Run the artifact with this runtime (e.g. opencv for an .onnx); default: by its suffix.")
@click.option("--widerface", type=click.Path(), default=None,
              help="WIDER FACE root (WIDER_val/images + ground_truth/*.mat); default $FFEXPORT_WIDERFACE.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate at most N images (stratified), for a quick look.")
@click.option("--exclude-calibration/--all-images", "exclude", default=True, show_default=True,
              help="Leave out the calibration-manifest images, for every artifact: fp32, int8 and fold are scored "
                   "on the same images (an int8/fold file is never scored on images it was fitted to).")
@click.option("--baked-thresholds", "baked_ok", is_flag=True,
              help="Score a static --nms file at the thresholds baked into it even when they are not the "
                   "protocol's (conf 0.02, NMS 0.4); the result is labelled as not comparable.")
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--preds-dir", type=click.Path(), default=None, help="Also write per-image WIDER FACE txt predictions.")
@click.option("--dcn", type=click.Choice(["grid", "plain"]), default="grid", show_default=True,
              help="PyTorch model only: 'plain' measures the AP cost of dropping the deformable offsets.")
@click.option("--input-size", default=None,
              help="HxW to letterbox to, or 'original' (each image at its own size): the PyTorch model and "
                   "--dynamic artifacts take any; a fixed-size artifact only its own (default: the artifact's "
                   "size; PyTorch: original).")
@user_errors
@click.pass_context
def eval_(ctx, artifact, model, weights, runtime, widerface, limit, exclude, baked_ok, json_out, preds_dir, dcn,
          input_size):
    """WIDER FACE Easy/Medium/Hard AP (official protocol) of ARTIFACT, or of the PyTorch model."""
    from .evaluate import calibrated_on_manifest, evaluate_runner, format_result
    from .exporter import check_writable
    from .runtime import load_runner

    root = widerface or os.environ.get("FFEXPORT_WIDERFACE")
    if not root:
        raise FFExportError("no WIDER FACE folder: pass --widerface DIR or set FFEXPORT_WIDERFACE")
    if artifact is not None and artifact.lower().endswith(".pth"):
        pass  # a checkpoint is the PyTorch model: --model/--dcn apply
    elif artifact is not None and _explicit(ctx, "model", "weights", "dcn"):
        raise FFExportError(f"{', '.join('--' + n for n in _explicit(ctx, 'model', 'weights', 'dcn'))} apply to the "
                            f"PyTorch model only, but {artifact} is given: drop them (the artifact says what it is)")
    if json_out:
        check_writable(json_out, "--json", inputs=(artifact,))
    if preds_dir and Path(preds_dir).exists() and not Path(preds_dir).is_dir():
        raise FFExportError(f"--preds-dir {preds_dir} is a file, not a folder: choose a folder path")
    runner = load_runner(artifact, model, weights, dcn=dcn, runtime=runtime)
    if input_size is not None:
        from .sweep import at_size, parse_sizes

        sizes = parse_sizes(input_size)
        if len(sizes) != 1:
            raise FFExportError(f"--input-size {input_size}: eval takes one size (sweep sizes with "
                                f"'ffexport report --input-size A,B,...')")
        at_size(runner, sizes[0])
    if not exclude and calibrated_on_manifest(runner):
        click.echo(f"warning: {Path(artifact).name} was calibrated on the calibration-manifest images that "
                   f"--all-images includes: its AP is optimistic, not comparable with an fp32 row", err=True)
    result = evaluate_runner(runner, root, limit, preds_dir, exclude_calibration=exclude, baked_ok=baked_ok)
    result["dcn"] = dcn if artifact is None else "as exported"
    click.echo(format_result(result))
    if json_out:
        write_json(json_out, result)


# ---- bench ----

def _split(value, parse=str, what="value", option=""):
    try:
        return [parse(v.strip()) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise FFExportError(f"{option} {value!r} is not a comma-separated list of {what}s: e.g. {option} 1,2") from None


@cli.command()
@click.option("--target", "targets", default="torch,onnxruntime,onnxruntime-int8", show_default=True,
              help="Comma-separated targets (`ffexport info targets` lists them), or 'all'.")
@click.option("--model", "models", default="v1,v2", show_default=True)
@click.option("--input-size", "sizes", default="640x640", show_default=True, help="Comma-separated HxW.")
@click.option("--threads", default="1", show_default=True, help="Comma-separated thread counts.")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--remote", default=None, help="ARM targets: user@host[:port] of an ARM board reachable by ssh.")
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--plot", "plot_out", type=click.Path(), default=None, help="PNG of latency per target, V1 vs V2.")
@user_errors
def bench(targets, models, sizes, threads, runs, warmup, remote, json_out, plot_out):
    """Latency per target, V1 and V2 interleaved, with the V2/V1 ratio and a verdict on the '2x' claim."""
    from ffexport.models import MODELS

    from . import bench as B
    from .exporter import check_writable
    from .images import parse_size
    from .targets import targets as all_targets

    table = all_targets()
    names = list(table) if targets == "all" else _split(targets)
    unknown = [t for t in names if t not in table]
    if unknown or not names:
        raise FFExportError(f"unsupported target {', '.join(unknown) or '(none)'}: choose from {', '.join(table)}")
    models = _split(models)
    if not models or any(m not in MODELS for m in models):
        raise FFExportError(f"--model takes {', '.join(MODELS)} or {','.join(MODELS)} (got {','.join(models)})")
    size_list = [parse_size(s) for s in _split(sizes)]
    thread_list = _split(threads, int, "whole number", "--threads")
    if not thread_list or any(t < 1 or t > 256 for t in thread_list):
        raise FFExportError(f"--threads {threads}: thread counts must be whole numbers from 1 to 256")
    if not size_list:
        raise FFExportError("--input-size is empty: give e.g. 640x640")
    for path, opt in ((json_out, "--json"), (plot_out, "--plot")):
        if path:
            check_writable(path, opt)
    result = B.bench(names, models, size_list, thread_list, runs, warmup, remote=remote,
                     progress=lambda m: click.echo(m, err=True))
    click.echo(B.table(result))
    result["ratios"], result["verdict"] = B.ratios(result), B.verdict(result)
    click.echo("\n" + result["verdict"])
    if json_out:
        write_json(json_out, result)
    if plot_out:
        B.plot(result, plot_out)
    if not any(r["status"] == "ok" for r in result["rows"]):
        raise FFExportError("no target ran (every row failed or was skipped, see the table): fix the first "
                            "failure or choose other --target values")


@cli.command()
@click.option("--model", "models", default="v1,v2", show_default=True)
@click.option("--format", "targets", default="torch,onnxruntime,onnxruntime-int8,tflite,tflite-int8",
              show_default=True, help="Comma-separated bench targets (ffexport info targets), or 'all'.")
@click.option("--input-size", default="640x640", show_default=True,
              help="HxW, or a comma-separated list (and/or 'original') for the size sweep: AP and latency per "
                   "artifact per size, sizes.json/md/png (docs/input-size.md).")
@click.option("--images", type=click.IntRange(min=1), default=None,
              help="WIDER FACE evaluation images per row (default: all, calibration images excluded).")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--peers", default="yunet,retinaface-1mb,blazeface", show_default=True,
              help="Comma-separated peer detectors, or 'none'.")
@click.option("--min-ap", default=None, help="E,M,H floor in AP points (e.g. 90,85,55): exit 1 if a verified "
                                              "artifact falls below it.")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("-o", "--output", "out_dir", default="report", show_default=True, help="Output folder.")
@click.option("--latency-budget", type=Finite(0), default=None,
              help="Size sweep: per target, name the size with the best Hard AP within MS (this host's latency).")
@click.option("--ray", "ray_address", default=None, help="Size sweep: run its tasks on the Ray cluster at ADDRESS "
                                                          "(or 'auto').")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Size sweep: run its tasks in N local worker processes (default 1: this process).")
@click.option("--sweep-cache", type=click.Path(file_okay=False), default=None,
              help="Size sweep: results cache folder (default: the user cache); an interrupted sweep resumes.")
@user_errors
@click.pass_context
def report(ctx, models, targets, input_size, images, threads, peers, min_ap, runs, out_dir, latency_budget,
           ray_address, workers, sweep_cache):
    """Every artifact's status, size, parity, WIDER AP and latency, with peer detectors, in one table."""
    from .images import parse_size
    from .report import run_report

    if "," in input_size or "original" in input_size.lower() or any(
            v is not None for v in (latency_budget, ray_address, workers, sweep_cache)):
        from .sweep import run_sweep

        ignored = _explicit(ctx, "peers", "min_ap", "threads")
        if ignored:
            raise FFExportError(f"{', '.join('--' + n.replace('_', '-') for n in ignored)} apply to the one-size "
                                f"report, not the size sweep (FeatherFace only, 1 thread): drop them")
        run_sweep(_split(models), "all" if targets == "all" else _split(targets), input_size, images,
                  latency_budget, workers or 1, ray_address, out_dir, runs=runs, cache=sweep_cache,
                  progress=lambda m: click.echo(m, err=True))
        click.echo(Path(out_dir, "sizes.md").read_text())
        return

    floor = None
    if min_ap:
        try:
            floor = tuple(float(v) if v.strip() else None for v in min_ap.split(","))
        except ValueError:
            raise FFExportError(f"--min-ap {min_ap}: give three AP floors E,M,H in points, e.g. 90,85,55") from None
        if len(floor) != 3:
            raise FFExportError(f"--min-ap {min_ap}: give three AP floors E,M,H in points, e.g. 90,85,55")
    result = run_report(_split(models), "all" if targets == "all" else _split(targets), parse_size(input_size),
                        images, threads, () if peers == "none" else _split(peers), floor, out_dir, runs=runs,
                        progress=lambda m: click.echo(m, err=True))
    click.echo(Path(out_dir, "report.md").read_text())
    below = result.get("below_min_ap") or []
    if below:
        raise FFExportError(f"{below[0]['message']}" + (f" (and {len(below) - 1} more)" if len(below) > 1 else ""))


# ---- export commands, one per format, generated from the table ----

def _option_param(o):
    from .formats.base import Option

    assert isinstance(o, Option)
    flag = "--" + o.name.replace("_", "-")
    if o.type is bool:
        decl = o.flag or f"{flag}/--no-{o.name.replace('_', '-')}"
        return click.Option([decl, o.name], default=o.default, show_default=True, help=o.help,
                            is_flag=True if "/" not in decl else None)
    if o.choices:
        kind = click.Choice(list(o.choices))
    elif o.type is float:
        kind = Finite(o.min, o.max)
    elif o.type is int and (o.min is not None or o.max is not None):
        kind = click.IntRange(o.min, o.max)
    else:
        kind = o.type
    return click.Option([flag, o.name], type=kind, default=o.default, show_default=True, help=o.help)


def _export_command(fmt):
    from . import formats

    src = formats.exporting(fmt)
    params = [
        click.Option(["--model"], type=click.Choice(_model_names()), default="v2", show_default=True,
                     help="FeatherFace variant."),
        click.Option(["--weights"], type=click.Path(dir_okay=False), default=None,
                     help="Checkpoint path (default: the published one, see docs/formats.md)."),
        click.Option(["--input-size"], default="640x640", show_default=True, help="HxW, multiples of 32."),
    ]
    if len(fmt.dcn_forms) > 1:
        params.append(click.Option(["--dcn"], type=click.Choice(list(fmt.dcn_forms)), default=fmt.default_dcn,
                                   show_default=True, help="Deformable-conv form (docs/dcn-forms.md)."))
    if len(fmt.precisions) > 1:
        params.append(click.Option(["--precision"], type=click.Choice(list(fmt.precisions)),
                                   default=fmt.precisions[0], show_default=True, help="Compute precision."))
    if src.quantize:
        params.append(click.Option(["--quantize"], type=click.Choice(list(src.quantize)), default=None,
                                   help="Post-training quantization."))
    if src.quantize or "fold" in fmt.dcn_forms:
        params += [click.Option(["--calib"], type=click.Path(), default=None,
                                help="Calibration images (WIDER FACE tree or any folder); default: WIDER FACE."),
                   click.Option(["--calib-size"], type=click.IntRange(min=1), default=100, show_default=True,
                                help="Number of calibration images.")]
    if "fold" in fmt.dcn_forms:
        params.append(click.Option(["--fold-keep"], type=click.IntRange(0, 15), default=None,
                                   help="--dcn fold: keep this many of the most sensitive DCNs exact "
                                        "(default: measured, see docs/dcn-forms.md)."))
    if src.dynamic:
        params.append(click.Option(["--dynamic"], is_flag=True, help="Dynamic batch/H/W (any multiple of 32)."))
    if src.nms:
        # --conf/--iou/--max-det serve --nms and any format flag declared to take them (Option.thresholds)
        users = "/".join(["--nms"] + ["--" + o.name.replace("_", "-") for o in src.options if o.thresholds])
        params += [click.Option(["--nms"], is_flag=True, help="Decoding, score threshold and NMS in the graph: "
                                                              "outputs boxes/scores/landmarks (docs/artifact-contract.md)."),
                   click.Option(["--conf"], type=Finite(0, 1), default=0.5, show_default=True,
                                help=f"{users} score threshold."),
                   click.Option(["--iou"], type=Finite(0, 1), default=0.4, show_default=True,
                                help=f"{users} IoU threshold."),
                   click.Option(["--max-det"], type=click.IntRange(1, 5000), default=300, show_default=True,
                                help=f"{users}: at most this many faces.")]
    if src.image_input:
        params.append(click.Option(["--image-input"], is_flag=True,
                                   help="uint8 (1,H,W,3) RGB input; mean subtraction in the graph."))
    params += [_option_param(o) for o in src.options]
    params += [click.Option(["-o", "--output"], default=None, help=f"Output {fmt.suffixes[0]} "
                                                                   f"(default featherface_<model>[_tags]{fmt.suffixes[0]})."),
               click.Option(["--no-check"], is_flag=True, help="Skip running the artifact against PyTorch."),
               click.Option(["--verbose"], is_flag=True, help="Show library output and tracebacks.")]

    @user_errors
    def callback(model, weights, input_size, output, no_check, **kw):
        from .exporter import export
        from .formats.base import ExportOptions, NmsOptions
        from .images import parse_size

        own = {o.name: kw.pop(o.name) for o in src.options}
        if kw.get("dcn") == "plain":
            from .plain_cost import PLAIN_DCN_COST

            click.echo(f"warning: --dcn plain drops the deformable offsets: {PLAIN_DCN_COST}", err=True)
        if kw.get("dcn") != "fold" and kw.get("fold_keep") is not None:
            raise FFExportError("--fold-keep applies to --dcn fold only: add --dcn fold or drop --fold-keep")
        nms = NmsOptions(kw["conf"], kw["iou"], kw["max_det"]) if kw.get("nms") else None
        for o in src.options:
            if o.thresholds and own[o.name]:
                own[o.name] = NmsOptions(kw["conf"], kw["iou"], kw["max_det"])
        if (nms or any(isinstance(v, NmsOptions) for v in own.values())) and kw["conf"] >= 1:
            # scores are at most 1 and kept strictly above --conf
            raise FFExportError(f"--conf {kw['conf']:g} keeps no face (scores are at most 1, kept when above "
                                f"--conf): choose a value below 1, e.g. 0.5")
        opts = ExportOptions(input_size=parse_size(input_size), dynamic=kw.get("dynamic", False),
                             precision=kw.get("precision"), quantize=kw.get("quantize"), dcn=kw.get("dcn"),
                             calib=kw.get("calib"), calib_size=kw.get("calib_size", 100),
                             fold_keep=kw.get("fold_keep"), nms=nms,
                             image_input=kw.get("image_input", False), extra=own)
        if fmt.export_as:  # a runtime for another format's file (opencv: an ONNX in the form it opens)
            opts = ExportOptions(**{**opts.__dict__, "dcn": opts.dcn or fmt.default_dcn})
        export(fmt.name, model, output, opts, weights=weights, check=not no_check)

    return click.Command(fmt.name, params=params, callback=callback,
                         help=f"Export to {fmt.description}.")


def _register_exports():
    from .formats import FORMATS

    for fmt in FORMATS:
        if fmt.export is not None:
            cli.add_command(_export_command(fmt))


_register_exports()


@cli.command()
@click.argument("what", type=click.Choice(["formats", "targets"]), default="formats")
@user_errors
def info(what):
    """List the formats (with what each needs and whether it runs here) or the bench targets."""
    from .formats import FORMATS
    from .targets import targets

    if what == "targets":
        for name, t in targets().items():
            reason = t.skip()
            click.echo(f"{name:<24} {'ok' if reason is None else 'unavailable: ' + reason}")
        return
    for f in FORMATS:
        export = "" if f.export or f.export_as else " (reference)"
        ready = f.available() or f.runnable()
        click.echo(f"{f.name:<12} {', '.join(f.suffixes):<22} {f.description}{export}"
                   f"{'' if ready is None else '  [' + ready + ']'}")

"""A reference evaluator of Core ML ML Programs for machines without Core ML (Linux).

coremltools' milproto loader rebuilds the MIL Program of a saved .mlpackage (ops, their attributes and the
weights from the blob); it has no interpreter (an op's value_inference is constant folding only). This
module evaluates that program: one small pure function per MIL op type, in `OPS`. Values are torch tensors;
every op computes in float32 and its result is stored in the dtype the program declares for it, so an fp16
program is rounded to fp16 at each op output, as the graph says. This is the graph's semantics, not Apple's
kernels (which run only on macOS, and may order or fuse fp16 arithmetic differently): numbers from it are
labelled "MIL reference evaluation".

An op type missing from `OPS` is a one-line FFExportError naming it.
"""
import numpy as np
import torch
import torch.nn.functional as F

from ...errors import FFExportError

LABEL = "MIL reference evaluation (graph semantics; Apple's kernels run only on macOS)"
TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64, "int32": torch.int32,
                "int64": torch.int64, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
                "bool": torch.bool}


def _list(v):
    """A const attribute (tensor, array or scalar) as a python scalar or list."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _conv_pad(pad_type, pad, kernel, strides, dilations, size):
    """(top, bottom, left, right) explicit padding of a MIL conv / pool."""
    if pad_type == "custom":
        return [int(p) for p in pad]
    if pad_type == "valid":
        return [0, 0, 0, 0]
    if pad_type in ("same", "same_lower"):
        out = []
        for k, s, d, n in zip(kernel, strides, dilations, size):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            small, large = total // 2, total - total // 2
            out += [large, small] if pad_type == "same_lower" else [small, large]
        return out
    raise FFExportError(f"MIL pad_type {pad_type!r} is not known to the reference evaluator: report this as an ffexport bug")


def conv(a):
    x, w = a["x"], a["weight"]
    strides, dil = _list(a.get("strides", [1, 1])), _list(a.get("dilations", [1, 1]))
    t, b, l, r = _conv_pad(a.get("pad_type", "valid"), _list(a.get("pad", [0, 0, 0, 0])), w.shape[2:], strides, dil,
                           x.shape[2:])
    x = F.pad(x, (l, r, t, b))
    return F.conv2d(x, w, a.get("bias"), strides, 0, dil, int(_list(a.get("groups", 1))))


def max_pool(a):
    x, k = a["x"], _list(a["kernel_sizes"])
    strides = _list(a["strides"])
    t, b, l, r = _conv_pad(a.get("pad_type", "valid"), _list(a.get("pad", [0, 0, 0, 0])), k, strides, [1, 1],
                           x.shape[2:])
    x = F.pad(x, (l, r, t, b), value=float("-inf"))
    return F.max_pool2d(x, k, strides, ceil_mode=bool(_list(a.get("ceil_mode", False))))


def pad(a):
    x, p = a["x"], [int(v) for v in _list(a["pad"])]
    pairs = [p[i:i + 2] for i in range(0, len(p), 2)][::-1]  # MIL: first dim first; F.pad: last dim first
    mode = a.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, [v for pr in pairs for v in pr], value=float(_list(a.get("constant_val", 0.0))))
    return F.pad(x, [v for pr in pairs for v in pr], mode={"reflect": "reflect", "replicate": "replicate"}[mode])


def slice_by_index(a):
    x = a["x"]
    n = x.dim()
    begin, end = _list(a["begin"]), _list(a["end"])
    stride = _list(a.get("stride", [1] * n))
    bm, em = _list(a.get("begin_mask", [False] * n)), _list(a.get("end_mask", [False] * n))
    sq = _list(a.get("squeeze_mask", [False] * n))
    index = []
    for i in range(n):
        if sq[i]:
            index.append(begin[i])
        else:
            index.append(slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i]))
    if any(s < 0 for s in stride):
        raise FFExportError("slice_by_index with a negative stride is not known to the reference evaluator: "
                            "report this as an ffexport bug")
    return x[tuple(index)]


def reshape(a):
    x, shape = a["x"], [int(v) for v in _list(a["shape"])]
    return x.reshape([x.shape[i] if v == 0 else v for i, v in enumerate(shape)])


def _axes(a, x):
    axes = a.get("axes")
    return list(range(x.dim())) if axes is None else [int(v) for v in np.ravel(_list(axes))]


def reduce(fn):
    return lambda a: fn(a["x"], dim=_axes(a, a["x"]), keepdim=bool(_list(a.get("keep_dims", False))))


def expand_dims(a):
    x = a["x"]
    out_rank = x.dim() + len(_axes(a, x))
    for ax in sorted(v % out_rank for v in _axes(a, x)):
        x = x.unsqueeze(ax)
    return x


def squeeze(a):
    x = a["x"]
    if a.get("axes") is None:
        return x.squeeze()
    for ax in sorted((v % x.dim() for v in _axes(a, x)), reverse=True):
        x = x.squeeze(ax)
    return x


def resample(a):
    mode = a.get("coordinates_mode", "normalized_minus_one_to_one")
    if mode != "normalized_minus_one_to_one" or a.get("padding_mode", "constant") not in ("constant", "border",
                                                                                          "reflection"):
        raise FFExportError(f"resample with coordinates_mode {mode} is not known to the reference evaluator: "
                            f"report this as an ffexport bug")
    padding = {"constant": "zeros", "border": "border", "reflection": "reflection"}[a.get("padding_mode", "constant")]
    if padding == "zeros" and float(_list(a.get("padding_value", 0.0))) != 0.0:
        raise FFExportError("resample with a non-zero padding_value is not known to the reference evaluator")
    return F.grid_sample(a["x"], a["coordinates"], mode=a.get("sampling_mode", "bilinear"), padding_mode=padding,
                         align_corners=bool(_list(a.get("align_corners", False))))


def batch_norm(a):
    x = a["x"]
    view = [1, -1] + [1] * (x.dim() - 2)
    y = (x - a["mean"].view(view)) / torch.sqrt(a["variance"].view(view) + float(_list(a.get("epsilon", 1e-5))))
    if a.get("gamma") is not None:
        y = y * a["gamma"].view(view)
    return y + a["beta"].view(view) if a.get("beta") is not None else y


def matmul(a):
    x, y = a["x"], a["y"]
    if _list(a.get("transpose_x", False)):
        x = x.transpose(-1, -2)
    if _list(a.get("transpose_y", False)):
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


def concat(a):
    if _list(a.get("interleave", False)):
        raise FFExportError("concat with interleave is not known to the reference evaluator")
    return torch.cat(list(a["values"]), int(_list(a["axis"])))


def gather(a):
    x, idx, axis = a["x"], a["indices"].long(), int(_list(a.get("axis", 0)))
    if int(_list(a.get("batch_dims", 0))):
        raise FFExportError("gather with batch_dims is not known to the reference evaluator")
    axis %= x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return x.index_select(axis, idx.reshape(-1)).reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


def topk(a):
    x, k, axis = a["x"], int(_list(a.get("k", 1))), int(_list(a.get("axis", -1)))
    ascending = bool(_list(a.get("ascending", False)))
    # Ties by index (stable), as the host's argsort(kind="stable"); Core ML does not specify its tie order.
    order = torch.argsort(x if ascending else -x, dim=axis, stable=True).narrow(axis, 0, k)
    return torch.gather(x, axis, order), order.to(torch.int32)


def non_maximum_suppression(a):
    """iOS15 form: boxes (n,B,4) centre x, y, width, height; scores (n,B,K) -> boxes, scores, indices, count."""
    boxes, scores = a["boxes"].double().numpy(), a["scores"].double().numpy()
    iou_t, score_t = float(_list(a["iou_threshold"])), float(_list(a["score_threshold"]))
    m = int(_list(a["max_boxes"]))
    if _list(a.get("per_class_suppression", False)):
        raise FFExportError("non_maximum_suppression per class is not known to the reference evaluator")
    n, _, k = scores.shape
    out_b, out_s = np.zeros((n, m, 4)), np.zeros((n, m, k))
    out_i, out_c = np.full((n, m), -1, np.int32), np.zeros(n, np.int32)
    for b in range(n):
        best = scores[b].max(1)
        cand = np.flatnonzero(best >= score_t)  # "boxes with scores below the threshold are rejected"
        cand = cand[np.argsort(-best[cand], kind="stable")]
        cx, cy, w, h = boxes[b, cand].T
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        area = w * h
        keep, alive = [], np.ones(len(cand), bool)
        for i in range(len(cand)):
            if not alive[i]:
                continue
            keep.append(i)
            if len(keep) == m:
                break
            iw = np.clip(np.minimum(x2[i], x2[i + 1:]) - np.maximum(x1[i], x1[i + 1:]), 0, None)
            ih = np.clip(np.minimum(y2[i], y2[i + 1:]) - np.maximum(y1[i], y1[i + 1:]), 0, None)
            inter = iw * ih
            alive[i + 1:] &= inter / (area[i] + area[i + 1:] - inter) <= iou_t
        sel = cand[keep]
        out_b[b, :len(sel)], out_s[b, :len(sel)] = boxes[b, sel], scores[b, sel]
        out_i[b, :len(sel)], out_c[b] = sel, len(sel)
    return (torch.from_numpy(out_b).float(), torch.from_numpy(out_s).float(), torch.from_numpy(out_i),
            torch.from_numpy(out_c))


def constexpr_affine_dequantize(a):
    q, zero, scale, axis = a["quantized_data"], a["zero_point"], a["scale"], int(_list(a["axis"]))
    view = [1] * q.dim()
    if zero.dim():
        view[axis] = -1
    return (q.float() - zero.float().reshape(view if zero.dim() else [])) * scale.float().reshape(
        view if scale.dim() else [])


def _binary(fn):
    return lambda a: fn(a["x"], a["y"])


def _unary(fn):
    return lambda a: fn(a["x"])


OPS = {
    "add": _binary(torch.add), "sub": _binary(torch.sub), "mul": _binary(torch.mul),
    "real_div": _binary(torch.div), "maximum": _binary(torch.maximum), "minimum": _binary(torch.minimum),
    "pow": _binary(torch.pow), "floor_div": _binary(lambda x, y: torch.div(x, y, rounding_mode="floor")),
    "greater": _binary(torch.gt), "greater_equal": _binary(torch.ge), "less": _binary(torch.lt),
    "less_equal": _binary(torch.le), "equal": _binary(torch.eq), "not_equal": _binary(torch.ne),
    "logical_and": _binary(torch.logical_and), "logical_or": _binary(torch.logical_or),
    "logical_not": _unary(torch.logical_not),
    "abs": _unary(torch.abs), "floor": _unary(torch.floor), "ceil": _unary(torch.ceil), "exp": _unary(torch.exp),
    "sqrt": _unary(torch.sqrt), "round": _unary(torch.round), "relu": _unary(F.relu), "sigmoid": _unary(torch.sigmoid),
    "silu": _unary(F.silu), "tanh": _unary(torch.tanh),
    "leaky_relu": lambda a: F.leaky_relu(a["x"], float(_list(a.get("alpha", 0.01)))),
    "clip": lambda a: torch.clamp(a["x"], float(_list(a["alpha"])), float(_list(a["beta"]))),
    "softmax": lambda a: torch.softmax(a["x"], int(_list(a.get("axis", -1)))),
    "cast": lambda a: a["x"],  # the output's declared dtype does the conversion (truncation toward zero)
    "identity": lambda a: a["x"],
    "conv": conv, "max_pool": max_pool, "pad": pad, "batch_norm": batch_norm, "matmul": matmul,
    "upsample_nearest_neighbor": lambda a: F.interpolate(
        a["x"], scale_factor=(float(_list(a.get("scale_factor_height", 1))),
                              float(_list(a.get("scale_factor_width", 1)))), mode="nearest"),
    "slice_by_index": slice_by_index, "reshape": reshape, "expand_dims": expand_dims, "squeeze": squeeze,
    "transpose": lambda a: a["x"].permute(*[int(v) for v in _list(a["perm"])]),
    "concat": concat, "stack": lambda a: torch.stack(list(a["values"]), int(_list(a["axis"]))),
    "tile": lambda a: a["x"].repeat(*[int(v) for v in _list(a["reps"])]),
    "reduce_sum": reduce(torch.sum), "reduce_mean": reduce(torch.mean),
    "reduce_max": reduce(lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim)),
    "gather_along_axis": lambda a: torch.gather(a["x"], int(_list(a["axis"])) % a["x"].dim(), a["indices"].long()),
    "gather": gather, "topk": topk, "non_maximum_suppression": non_maximum_suppression,
    "resample": resample, "constexpr_affine_dequantize": constexpr_affine_dequantize,
    "range_1d": lambda a: torch.arange(float(_list(a["start"])), float(_list(a["end"])), float(_list(a["step"]))),
}


def _dtype(var):
    from coremltools.converters.mil.mil.types import builtin_to_string, is_tensor

    t = var.sym_type
    return builtin_to_string(t.get_primitive() if is_tensor(t) else t)


def _as_tensor(val):
    if isinstance(val, (str, bool)) or val is None:
        return val
    arr = np.asarray(val)
    if arr.dtype.kind in "U S O":
        return val
    return torch.from_numpy(np.array(arr, dtype=np.float32 if arr.dtype == np.float16 else arr.dtype, copy=True))


class Program:
    """A loaded ML Program, ready to evaluate: `Program(mlmodel)(input=array)` -> {output name: numpy}.

    `spec`: one model of a pipeline package (`mlmodel`), whose weights are in the package's weights folder
    under their own file name (make_pipeline gives model i "i-weight.bin"; the loader resolves names there)."""

    def __init__(self, mlmodel, spec=None):
        from coremltools.converters.mil.frontend.milproto.load import load

        spec = spec if spec is not None else mlmodel.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise FFExportError(f"the reference evaluator reads ML Programs, not a {spec.WhichOneof('Type')} "
                                f"model: re-export it with 'ffexport coreml'")
        prog = load(spec, spec.specificationVersion, mlmodel.weights_dir)
        fn = prog.functions["main"]
        self.inputs = dict(fn.inputs)
        self.outputs = [v.name for v in fn.outputs]
        self.ops, self.consts = [], {}
        for op in fn.operations:
            if op.op_type == "const":
                self.consts[op.outputs[0].name] = _as_tensor(op.outputs[0].val)
                continue
            if op.op_type not in OPS:
                raise FFExportError(f"MIL op {op.op_type!r} ({op.name}) is not known to ffexport's Core ML reference "
                                    f"evaluator: it cannot check this program off macOS")
            args = {k: (tuple(v.name for v in val) if isinstance(val, (list, tuple)) else val.name)
                    for k, val in op.inputs.items()}
            outs = [(o.name, TORCH_DTYPES.get(_dtype(o))) for o in op.outputs]
            self.ops.append((op.op_type, args, outs))
        # constexpr ops depend on consts only: fold them once (the weights of an int8-weight program)
        env = dict(self.consts)
        for op_type, args, outs in [o for o in self.ops if o[0].startswith("constexpr_")]:
            self._run(env, op_type, args, outs)
        self.consts = env
        self.ops = [o for o in self.ops if not o[0].startswith("constexpr_")]

    @staticmethod
    def _run(env, op_type, args, outs):
        def value(name):
            v = env[name]
            return v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float16 else v

        a = {k: (tuple(value(n) for n in v) if isinstance(v, tuple) else value(v)) for k, v in args.items()}
        result = OPS[op_type](a)
        results = result if isinstance(result, tuple) else (result,)
        for (name, dtype), r in zip(outs, results):
            r = torch.as_tensor(r)
            env[name] = r.to(dtype) if dtype is not None else r

    def __call__(self, names=None, **feeds) -> dict:
        """{name: numpy} of the program outputs, or of any values `names` (e.g. an intermediate a test reads)."""
        env = dict(self.consts)
        for name, dtype in ((n, TORCH_DTYPES.get(_dtype(v))) for n, v in self.inputs.items()):
            env[name] = torch.as_tensor(np.asarray(feeds[name])).to(dtype)
        with torch.no_grad():
            for op_type, args, outs in self.ops:
                self._run(env, op_type, args, outs)
        return {n: env[n].float().numpy() if env[n].is_floating_point() else env[n].numpy()
                for n in (names or self.outputs)}

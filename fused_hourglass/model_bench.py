"""One side-by-side model benchmark (`python -m fused_hourglass bench --model`): the training step and the eval
forward of every way to run the network — eager reference (NCHW, channels_last, bf16 autocast), the fused backend
(NCHW, channels_last, autocast, each memory policy), torch.compile of the reference and of the fused model — timed
in interleaved rounds in one process, so that a drifting machine moves every row alike. Ratios are to the eager
reference with NCHW input; the eval forward is the steady state on fixed weights (the fourth after a step), the
first eval forward after a training step (which refolds the fused model's BatchNorms) has its own column, as do
compile times; saved-activation MiB per image (measured with saved_tensors_hooks, one storage counted once) beside
each training row's step time.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import HeatmapLoss, StackedHourglass, reference


@dataclass
class Row:
    name: str
    model: torch.nn.Module
    layout: torch.memory_format = torch.contiguous_format
    autocast: bool = False
    compile: bool = False
    compile_s: dict[str, float] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "eval": [], "first_eval": []})
    saved_mib: float | None = None


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
                autocast: bool = False) -> int:
    """Bytes autograd saves for backward in one forward of `model` in its current mode (each storage once;
    parameters excluded). With `target`, the HeatmapLoss's own saved tensors count too, and the graph is freed by
    a backward (gradients then cleared)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = model(x)
        loss = None if target is None else HeatmapLoss()(out.float(), target)
    if loss is not None:
        loss.backward()
        model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _runner(row: Row, x: torch.Tensor, target: torch.Tensor, mode: str) -> Callable[[], None]:
    net = row.model
    xin = x.contiguous(memory_format=row.layout)
    loss_fn = HeatmapLoss()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16) if row.autocast else contextlib.nullcontext()

    def train():
        net.train()
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = loss_fn(net(xin).float(), target)
        loss.backward()
        opt.step()

    def evaluate():
        net.eval()
        with torch.no_grad(), amp():
            net(xin)

    return train if mode == "train" else evaluate


def build_rows(nstack: int, inp_dim: int, *, compile: bool = True, policies: bool = True) -> list[Row]:
    torch.manual_seed(0)
    base = reference.StackedHourglass(nstack, inp_dim, 16)
    state = base.state_dict()

    def fused(**kw):
        m = StackedHourglass(nstack, inp_dim, 16, backend="fused", **kw)
        m.load_state_dict(state)
        return m

    def ref():
        m = reference.StackedHourglass(nstack, inp_dim, 16)
        m.load_state_dict(state)
        return m

    cl = torch.channels_last
    rows = [Row("reference eager, NCHW", ref()), Row("reference eager, channels_last", ref(), cl),
            Row("reference eager, bf16 autocast, CL", ref(), cl, autocast=True),
            Row("fused, NCHW", fused()), Row("fused, channels_last", fused(), cl),
            Row("fused, bf16 autocast, CL", fused(), cl, autocast=True)]
    if policies:
        rows += [Row(f"fused, recompute={p}, CL", fused(recompute=p), cl) for p in ("conv1", "block")]
    if compile:
        rows += [Row("compile(reference), CL", torch.compile(ref()), cl, compile=True),
                 Row("compile(reference), bf16 autocast, CL", torch.compile(ref()), cl, autocast=True, compile=True),
                 Row("compile(fused), CL", torch.compile(fused(), fullgraph=True), cl, compile=True)]
    return rows


def run(nstack: int = 2, inp_dim: int = 128, side: int = 128, batch: int = 4, rounds: int = 7,
        compile: bool = True, policies: bool = True, say: Callable[[str], None] = print) -> list[Row]:
    """Warm every row (compiling where asked, timed), then `rounds` interleaved rounds of one training step and one
    eval forward per row. Returns the rows with their times."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, side, side, generator=g)
    target = torch.rand(batch, 16, side // 4, side // 4, generator=g)
    rows = build_rows(nstack, inp_dim, compile=compile, policies=policies)
    runners = {}
    for row in rows:
        for mode in ("train", "eval"):
            fn = _runner(row, x, target, mode)
            t = time.perf_counter()
            fn()  # compiles on the first call of a compiled row
            if row.compile:
                row.compile_s[mode] = time.perf_counter() - t
            fn()
            runners[row.name, mode] = fn
        if not row.compile:
            row.model.train()  # the column is the training step's
            row.saved_mib = saved_bytes(row.model, x.contiguous(memory_format=row.layout), target,
                                        row.autocast) / batch / 2**20
        say(f"  ready: {row.name}" + (f" (compiled in {sum(row.compile_s.values()):.0f} s)" if row.compile else ""))
    for r in range(rounds):
        for row in rows:
            # the step changes the weights: the first eval forward after it refolds the fused model's BatchNorms
            # (timed apart: it refreshes the recorded forward); two more, untimed, and the fourth is the steady
            # state of inference on fixed weights
            for mode, key in (("train", "train"), ("eval", "first_eval"), ("eval", None), ("eval", None),
                              ("eval", "eval")):
                t = time.perf_counter()
                runners[row.name, mode]()
                if key is not None:
                    row.times[key].append(time.perf_counter() - t)
        say(f"  round {r + 1}/{rounds}")
    return rows


def table(rows: list[Row], header: str) -> str:
    base = {m: statistics.median(rows[0].times[m]) for m in ("train", "eval")}
    lines = [header, "",
             "| | training step | × eager NCHW | eval forward | × eager NCHW | first eval after a step | "
             "saved MiB/image | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t, e = statistics.median(row.times["train"]), statistics.median(row.times["eval"])
        first = statistics.median(row.times["first_eval"]) if row.times["first_eval"] else float("nan")
        saved = f"{row.saved_mib:.1f}" if row.saved_mib is not None else "–"
        comp = f"{row.compile_s.get('train', 0):.0f} + {row.compile_s.get('eval', 0):.0f}" if row.compile else "–"
        lines.append(f"| {row.name} | {_ms(t)} ms | {base['train'] / t:.2f}× | {_ms(e)} ms | "
                     f"{base['eval'] / e:.2f}× | {_ms(first)} ms | {saved} | {comp} |")
    lines += _against_compiled(rows)
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}" if seconds < 0.1 else f"{1e3 * seconds:.0f}"


def _against_compiled(rows: list[Row]) -> list[str]:
    """The fused model (channels_last input) against torch.compile(reference) in the same precision: the
    compiled time over the fused time, per mode (above 1: the fused model is faster)."""
    by_name = {row.name: row for row in rows}
    pairs = [("fp32", "fused, channels_last", "compile(reference), CL"),
             ("bf16 autocast", "fused, bf16 autocast, CL", "compile(reference), bf16 autocast, CL")]
    out = []
    for precision, fused, compiled in pairs:
        if fused in by_name and compiled in by_name:
            f, c = by_name[fused].times, by_name[compiled].times
            ratios = ", ".join(f"{label} {statistics.median(c[mode]) / statistics.median(f[mode]):.2f}×"
                               for mode, label in (("train", "training step"), ("eval", "eval"),
                                                   ("first_eval", "first eval after a step")))
            out.append(f"fused against torch.compile(reference), {precision}: {ratios} (its time over the fused)")
    return [""] + out if out else []


def plot(rows: list[Row], path: str) -> str:
    """Saved MiB per image against training-step time for the rows that have both."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"skipped {path}: matplotlib is not installed (pip install '.[plot]')"
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=110)
    # rows at one point (the fused model with either input layout) share a label
    points: list[tuple[float, float, list[str]]] = []
    for row in rows:
        if row.saved_mib is None:
            continue
        t = 1e3 * statistics.median(row.times["train"])
        for pt in points:
            if abs(pt[0] - t) <= 0.03 * t and abs(pt[1] - row.saved_mib) < 0.05:
                pt[2].append(row.name)
                break
        else:
            points.append((t, row.saved_mib, [row.name]))
    x_span = (max(p[0] for p in points) - min(p[0] for p in points) if points else 0.0) or 1.0
    y_span = (max(p[1] for p in points) - min(p[1] for p in points) if points else 0.0) or 1.0
    char = 0.0105 * x_span  # a 7-point character's width in data units, about, at this figure size

    def covers(x0: float, x1: float, y: float) -> bool:
        """Whether a point, or a label already placed, lies in the box of a label from x0 to x1 at height y."""
        near = [(u, u) for u, _, _ in points] + boxes
        ys = [v for _, v, _ in points] + box_ys
        return any(a <= x1 and b >= x0 and abs(v - y) < 0.07 * y_span for (a, b), v in zip(near, ys, strict=True))

    boxes: list[tuple[float, float]] = []
    box_ys: list[float] = []
    for t, mib, names in sorted(points, key=lambda p: (-p[1], p[0])):
        ax.scatter([t], [mib])
        label = " / ".join(names)
        width = char * (len(label) + 1)
        # right of the point unless that box holds another point or label, then right and below, then left
        low = mib - 0.05 * y_span
        x_min = min(p[0] for p in points)
        if not covers(t + 0.5 * char, t + width, mib):
            box, y, offset, ha = (t, t + width), mib, (4, 3), "left"
        elif not covers(t + 0.5 * char, t + width, low):
            box, y, offset, ha = (t, t + width), low, (4, -10), "left"
        elif t - width >= x_min - 0.05 * x_span and not covers(t - width, t - 0.5 * char, mib):
            box, y, offset, ha = (t - width, t), mib, (-4, 3), "right"
        else:
            box, y, offset, ha = (t, t + width), low, (4, -10), "left"
        ax.annotate(label, (t, mib), fontsize=7, xytext=offset, textcoords="offset points", ha=ha)
        boxes.append(box)
        box_ys.append(y)
    for row in rows:  # compiled rows save what Inductor decides: their step time as a line
        if row.compile and row.times["train"]:
            t = 1e3 * statistics.median(row.times["train"])
            ax.axvline(t, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(row.name.replace(", CL", ""), (t, 0.55), xycoords=("data", "axes fraction"), fontsize=6,
                        rotation=90, va="bottom", ha="right", color="dimgrey", xytext=(-2, 0),
                        textcoords="offset points")
    ax.set_xlabel("training step, ms (median)")
    ax.set_ylabel("saved activations, MiB per image")
    ax.set_title("memory against time", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"wrote {path}"

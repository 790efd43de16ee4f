"""Folded inference: the eval-mode network with every BatchNorm that follows a convolution folded into it.

In eval mode a BatchNorm is the per-channel affine map y ↦ y·s + t, s = γ/√(running_var + eps), t = β − running_mean·s,
so after a convolution it folds into the convolution: W' = W·s per output channel, b' = b·s + t (computed in float64,
then rounded to the convolution's dtype). Folded: the stem Conv's BN, each Residual's bn2 (into conv1) and bn3 (into
conv2), each stack's feature Conv's BN. bn1 has no convolution before it (and a ReLU between it and the next): it
stays one `bn_relu_apply` pass. What follows a folded convolution, its ReLU, and the residual and merge additions run
inside the convolution as oneDNN post-ops (`torch.ops.mkldnn._convolution_pointwise`, "relu" and binary "add") on the
CPU in float32 (and bfloat16 where oneDNN supports it); elsewhere (float64, CUDA, a torch without those ops) as the
convolution followed by an in-place ReLU or add. A 1×1 convolution of a small channels_last plane on the CPU is one
matrix product (`torch.addmm`). A recorded forward (below) replays its post-op convolutions with their weights
prepacked by oneDNN for the recorded input shape (`PREPACK`), so that no call reorders its weight, and so takes them
on every plane; a forward that is not recorded (a model with inference tensors among its parameters and buffers)
takes them on planes of at least POST_OP_MIN_POSITIONS positions and ATen's convolution below. A residual or merge
addition writes its sum into the skip tensor (`_convolution_pointwise_`), and every intermediate is freed at its last
use: the forward allocates and touches as little fresh memory as a compiled graph.

The folded tensors are cached on the model per layer and compute dtype, under a key of every source tensor's data_ptr,
version counter, dtype, device and strides (the cache keeps the source storages alive, so an address is never reused
while its key is held): an optimizer step, `load_state_dict`, a training forward's running-statistics update, `with
torch.no_grad(): w.mul_(2)`, `to(dtype / device / memory_format)` or a replaced parameter refolds that layer at the next
folded forward. A step of a torch.optim optimizer that holds one of the model's parameters drops the folded tensors (a
global step hook: the fused optimizers write without bumping version counters). Writes through `.data` bypass the
version counter: call `clear_cache(model)` after them. Each forward first takes one key of the whole model from one walk
of its modules (which also finds any forward hook): every module, the attributes the folded path reads (eps, padding,
stride, dilation, groups, need_skip) and every parameter's and buffer's data_ptr and version (the key holds those
tensors, so no address in it is reused while it is held). When it equals the key at the start of the last forward of the
same dtype and memory format, that forward checked every layer since, and the layers' own keys are not built again. The
folded weights are kept in the activations' memory format. The first forward of an input shape records its ops
(functions, constant arguments, which earlier output each tensor argument is, which cache entry each folded tensor is),
and the next forwards under the same model key replay them: the same ops in the same order, each intermediate dropped
after its last use, with no module walk or cache lookup per layer (about 1 ms of Python less per forward). When only
tensors changed since (a training step, `load_state_dict`, an in-place write), not the modules or their attributes, the
next forward refreshes the recording instead: the layers whose keys changed refold together (every BatchNorm affine in
one batch, each weight one multiply) and the recording replays with them, bit for bit what a forward that folds from
scratch gives. A recording prepacks its weights at its first replay on unchanged weights: a refreshed one replays with
the plain weights once (an eval after every training step does not pay for packing). A training-mode forward drops the
folded tensors (stale after the step) and keeps the recordings without them.

`StackedHourglass` takes this path on the fused backend in eval mode when no gradient is recorded (`torch.no_grad()`,
`torch.inference_mode()`), not under torch.compile or torch.export (which trace the unfolded ops, visible as ops),
and with no forward hook on a submodule (the folded path calls none, so hooks keep the modules' own forwards);
`model.folded_inference = False` turns it off. `fold_reference(model)` is its plain-PyTorch twin: a reference
StackedHourglass with the same folded weights and nn.Identity in place of each folded BatchNorm, which `export --onnx`
exports.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import weakref
from collections.abc import Callable
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _ext, ops, reference
from .checkpoint import infer_config

__all__ = ["applies", "forward", "fold_conv_bn", "bn_scale_shift", "fold_reference", "clear_cache", "FoldCache",
           "pointwise_conv_available"]

# oneDNN convolutions with fused post-ops (the ones Inductor emits on the CPU); None in a torch without them.
_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
_POINTWISE_INPLACE = getattr(torch.ops.mkldnn, "_convolution_pointwise_", None)
# oneDNN's weight reorder (the prepacking that Inductor's freezing does): a weight in the blocked layout that a
# convolution of a given channels_last input shape reads, so that the call does not reorder it each time.
_PACK = getattr(torch.ops.mkldnn, "_reorder_convolution_weight", None)
# A recorded forward replays its post-op convolutions with their weights prepacked (from its first replay on weights
# that did not change since it was recorded or refreshed): reordered once into the blocked layout that oneDNN's
# kernel for that input shape reads, which a call on a plain weight does on every call (what Inductor's freezing
# does for a compiled graph). Each recording holds its own packed copy of the weights. Measured on 2 cores,
# batch 4, a 3×3 64→64 convolution with ReLU in float32: 28 / 32 / 58 / 161 µs at 2×2 / 4×4 / 8×8 / 16×16 against
# 59 / 63 / 85 / 189 µs unpacked and ATen's 57 / 54 / 81 / 187 µs; bit for bit the same output. False: never.
PREPACK = True
# Without prepacked weights, below this many input positions (N·H·W) a convolution takes ATen's path and an in-place
# ReLU or add instead (the post-op convolution is then as slow or slower: the figures above), from 32×32×4 on the
# post-op convolution.
POST_OP_MIN_POSITIONS = 1024
# Below this many positions a 1×1 convolution of channels_last activations on the CPU is a matrix product instead
# (`torch.addmm`): 128→64 channels at 4×4×4, 18 µs against 27 µs prepacked in float32 (28 against 25 in bfloat16),
# level at 4×8×8, behind from there (99 against 59 µs at 4×16×16).
MATMUL_MAX_POSITIONS = 256
# Recorded forwards kept per model (one per input shape, dtype and layout): a run over many shapes records each once
# and keeps the latest.
MAX_PLANS = 8


def pointwise_conv_available(x: torch.Tensor) -> bool:
    """Whether oneDNN's post-op fused convolution serves x (CPU, float32, or bfloat16 where oneDNN has it)."""
    if _POINTWISE is None or _POINTWISE_INPLACE is None or x.device.type != "cpu":
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if x.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return x.dtype == torch.float32


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of the eval-mode BatchNorm y·s + t, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("folded inference: every BatchNorm needs running statistics (track_running_stats=True); "
                         "set model.folded_inference = False to run this model in eval mode")
    var = bn.running_var.detach().double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    t = -bn.running_mean.detach().double() * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s, t


def _tracks_running_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.running_mean is not None and bn.running_var is not None


def _running_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    """Every BatchNorm of `model` with running statistics, in module order."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and _tracks_running_stats(m)]


def _affine_arrays(bns: list[nn.BatchNorm2d]) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """(s, t, sizes): `_bn_affine` of each BatchNorm of `bns`, concatenated in float64 and computed together (a
    handful of ops on the concatenated statistics instead of a handful per BatchNorm); None where they do not share
    a device."""
    if not bns or len({bn.running_var.device for bn in bns}) > 1:
        return None
    sizes = [bn.running_var.numel() for bn in bns]
    device = bns[0].running_var.device

    def cat(tensors):
        return torch.cat(tensors).double()  # (type promotion where the dtypes differ)

    with torch.inference_mode(False), torch.no_grad():
        var = cat([bn.running_var for bn in bns])
        eps = {bn.eps for bn in bns}
        if len(eps) == 1:  # the usual case: one eps, added as a scalar
            var = var + eps.pop()
        else:
            var = var + torch.cat([torch.full((n,), bn.eps, dtype=torch.float64) for bn, n in zip(bns, sizes,
                                                                                               strict=True)]).to(device)
        s = torch.rsqrt(var)
        s = s * cat([bn.weight if bn.weight is not None else torch.ones_like(bn.running_var) for bn in bns])
        t = cat([bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var) for bn in bns]) - cat(
            [bn.running_mean for bn in bns]) * s
    return s, t, sizes


def _affines_of(bns: list[nn.BatchNorm2d]) -> dict:
    """{bn: `_bn_affine(bn)`} for `bns`, computed together; {} where they do not share a device."""
    arrays = _affine_arrays(bns)
    if arrays is None:
        return {}
    s, t, sizes = arrays
    return dict(zip(bns, zip(s.split(sizes), t.split(sizes), strict=True), strict=True))


def _batched_affines(model: nn.Module) -> dict:
    """`_bn_affine` of every BatchNorm of `model` with running statistics, computed together: what a refold after a
    training step spends most of its time on otherwise; {} where they do not share a device."""
    return _affines_of(_running_bns(model))


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype,
                 affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of `bn(conv(x))` as one convolution, in `dtype` (W' in conv.weight's memory format); with bn None,
    conv's own weight and bias (zeros when it has none) in `dtype`. `affine`: bn's (s, t) when already computed."""
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if bn is None:
        return w.to(dtype), b.to(dtype)
    s, t = _bn_affine(bn) if affine is None else affine
    folded = (w.double() * s[:, None, None, None]).to(dtype)
    return folded.contiguous(memory_format=_ext.memory_format_of(w)), (b.double() * s + t).to(dtype)


def bn_scale_shift(bn: nn.BatchNorm2d, u_dtype: torch.dtype,
                   affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode (scale, shift) of `bn` for `bn_relu_apply` on u of `u_dtype` (float64 for float64 u, else
    float32: the statistics dtype). `affine`: bn's (s, t) when already computed."""
    s, t = _bn_affine(bn) if affine is None else affine
    stats = _stats_dtype(u_dtype)
    return s.to(stats), t.to(stats)


def _stats_dtype(u_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if u_dtype == torch.float64 else torch.float32


def _tensor_key(t: torch.Tensor | None):
    if t is None:
        return None
    return t.data_ptr(), t._version, t.dtype, t.device, t.stride()


def _recipe_sources(recipe: tuple) -> tuple[tuple, tuple]:
    """(source tensors, extra key values) of a recipe: ("conv", conv, bn or None), a convolution with the BatchNorm
    folded into it, or ("bn", None, bn), a BatchNorm's eval-mode scale and shift for `bn_relu_apply`."""
    kind, conv, bn = recipe
    if kind == "bn":
        return (bn.weight, bn.bias, bn.running_mean, bn.running_var), (bn.eps,)
    if bn is None:
        return (conv.weight, conv.bias), ()
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var), (bn.eps,)


def _sources_key(recipe: tuple) -> tuple[tuple, tuple | None]:
    """(the recipe's source tensors, the key of their current state), the key None where a source is an inference
    tensor (it keeps no version counter: nothing can be cached for it)."""
    sources, extra = _recipe_sources(recipe)
    try:
        return sources, (*extra, *map(_tensor_key, sources))
    except RuntimeError:
        return sources, None


def _compute(recipes: list[tuple], dtype: torch.dtype, variant: object, affines: dict
             ) -> list[tuple[torch.Tensor, ...]]:
    """The folded tensors of each recipe in `dtype`: (W', b') in the memory format `variant` (oneDNN's post-op
    convolution would otherwise copy W' on every call), or a BatchNorm's (scale, shift) for `bn_relu_apply`.
    `affines`: {bn: (s, t)} from `_affines_of`, holding every BatchNorm with running statistics that a recipe names.
    The values of `fold_conv_bn` and `bn_scale_shift`, in fewer ops: each W' one multiply that computes in float64
    (the weights promote, as W.double()·s) and stores in `dtype` and `variant`; the folded biases b·s + t on their
    concatenation. One layer's refold and every layer's after a training step take this same path."""
    values: list = [None] * len(recipes)
    folded, scaled = [], []
    with torch.inference_mode(False), torch.no_grad():
        for i, (kind, conv, bn) in enumerate(recipes):
            if kind == "bn" and bn in affines:
                scaled.append(i)
            elif kind == "bn":
                values[i] = bn_scale_shift(bn, dtype)
            elif bn is None or bn not in affines:
                w, b = fold_conv_bn(conv, bn, dtype)
                values[i] = (w.contiguous(memory_format=variant), b)
            else:
                folded.append(i)
        if scaled:  # bn_scale_shift's casts, on the concatenated affines
            stats = _stats_dtype(dtype)
            sizes = [affines[recipes[i][2]][0].shape[0] for i in scaled]
            scales, shifts = (torch.cat([affines[recipes[i][2]][k] for i in scaled]).to(stats).split(sizes)
                              for k in (0, 1))
            for i, scale, shift in zip(scaled, scales, shifts, strict=True):
                values[i] = (scale, shift)
        if folded:
            convs = [recipes[i][1] for i in folded]
            scales = [affines[recipes[i][2]][0] for i in folded]
            biases = torch.cat([c.bias if c.bias is not None else torch.zeros(c.weight.shape[0], dtype=c.weight.dtype,
                                                                                device=c.weight.device)
                                for c in convs]).double()
            biases = (biases * torch.cat(scales) + torch.cat([affines[recipes[i][2]][1] for i in folded])).to(dtype)
            for i, conv, scale, b in zip(folded, convs, scales, biases.split([c.weight.shape[0] for c in convs]),
                                         strict=True):
                out = torch.empty_like(conv.weight, dtype=dtype, memory_format=variant)
                values[i] = (torch.mul(conv.weight, scale.view(-1, 1, 1, 1), out=out), b)
    return values


class FoldCache:
    """Folded tensors per (layer, dtype, variant), each kept with the key of the tensors it was computed from;
    `folds` counts the computations (a cache miss each)."""

    def __init__(self) -> None:
        self.entries: dict = {}
        self.folds = 0
        # per kind of run (compute dtype, memory format): the model_state key at the start of its last forward,
        # after which every entry of that kind was checked against its own key
        self.checked: dict = {}
        # per (kind of run, input shape, device, PREPACK and the two plane thresholds): the ops of a forward,
        # replayed while the model's key is the one they were recorded under, and refreshed (refolded and rebound)
        # after a change to the model's tensors
        self.plans: dict = {}

    def __reduce__(self):
        # A pickled or deep-copied model gets an empty cache: the recorded ops hold functions that do not pickle,
        # and a copy's folded tensors are computed from its own parameters.
        return FoldCache, ()

    def get(self, recipe: tuple, dtype: torch.dtype, variant: object, affines: Callable[[], dict],
            trusted: bool = False) -> tuple[tuple, tuple[torch.Tensor, ...]]:
        """(slot, the folded tensors of `recipe` in `dtype` and `variant`), computed unless cached under the same key
        of the recipe's source tensors; `trusted`: the caller has checked that nothing changed since the entry was
        last checked, so a present entry is returned without building its key. `affines()`: every BatchNorm's
        (s, t) (`_batched_affines`), called at the first computation."""
        slot = (recipe[2] if recipe[0] == "bn" else recipe[1], dtype, variant)
        entry = self.entries.get(slot)
        if trusted and entry is not None:
            return slot, entry[2]
        return slot, self.fresh(slot, recipe, affines, entry)

    def fresh(self, slot: tuple, recipe: tuple, affines: Callable[[], dict], entry: tuple | None = None
              ) -> tuple[torch.Tensor, ...]:
        """The slot's folded tensors: `entry`'s when its key is the sources' current one, else computed and
        stored."""
        sources, key = _sources_key(recipe)
        if key is not None and entry is not None and entry[0] == key:
            return entry[2]
        value = _compute([recipe], slot[1], slot[2], {} if recipe[2] is None else affines())[0]
        if key is not None:
            self.store(slot, key, sources, value)
        return value

    def store(self, slot: tuple, key: tuple | None, sources: tuple, value: tuple[torch.Tensor, ...]) -> None:
        self.folds += 1
        # The storages keep their addresses from being reused by other tensors while the key holds them.
        storages = [t.untyped_storage() for t in sources if t is not None]
        self.entries[slot] = (key, storages, value)


# The models that have held a fold cache, for the optimizer step hook below.
_MODELS_WITH_CACHE: weakref.WeakSet = weakref.WeakSet()


def _cache(model: nn.Module) -> FoldCache:
    cache = model.__dict__.get("_fold_cache")
    if cache is None:
        cache = FoldCache()
        model.__dict__["_fold_cache"] = cache
        _MODELS_WITH_CACHE.add(model)
    return cache


def _holds_folded_tensors(cache: FoldCache) -> bool:
    return bool(cache.entries) or any(plan.model_key is not None for plan in cache.plans.values())


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any torch.optim optimizer's step: `release` every model that holds folded tensors and shares a parameter
    with the optimizer. The fused optimizers (`fused=True` Adam, AdamW, SGD) write the parameters without bumping
    their version counters, which the cache keys rely on. A training forward has usually released the model already,
    and then this costs one look at its cache."""
    ids = None
    for model in list(_MODELS_WITH_CACHE):
        cache = model.__dict__.get("_fold_cache")
        if cache is None or not _holds_folded_tensors(cache):
            continue
        if ids is None:
            ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) in ids for p in model.parameters()):
            release(model)


register_optimizer_step_post_hook(_after_optimizer_step)


def clear_cache(model: nn.Module) -> None:
    """Drop `model`'s folded tensors and recorded forwards (they are recomputed at the next folded forward)."""
    model.__dict__.pop("_fold_cache", None)


def release(model: nn.Module) -> None:
    """Drop `model`'s folded tensors (what a training forward does: they would be stale after the step) but keep the
    recorded forwards, without their folded constants: the next eval forward of a recorded shape refolds every layer
    (its BatchNorm affines in one batch) and replays, instead of walking the modules with a fold per layer."""
    cache = model.__dict__.get("_fold_cache")
    if cache is None:
        return
    cache.entries.clear()
    cache.checked.clear()
    for plan in cache.plans.values():
        plan.unbind()


def _global_hooks() -> bool:
    from torch.nn.modules import module as hooks

    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def _own_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def module_hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run a forward hook or pre-hook (its own or a global one)."""
    return _global_hooks() or _own_hooks(module)


def _blocked(model: nn.Module) -> bool:
    """Whether a forward hook or pre-hook is registered on a submodule of `model` or globally (the folded path calls
    no submodule, so it would never fire), or a BatchNorm is in training mode."""
    return model_state(model)[0]


# The attributes the folded path reads, per kind of module (the tensors it reads are keyed by address and version).
_READ_ATTRIBUTES = ((nn.modules.batchnorm._BatchNorm, ("eps",)),
                    (nn.Conv2d, ("padding", "stride", "dilation", "groups")),
                    (reference.Residual, ("need_skip",)),
                    (reference.StackedHourglass, ("nstack",)))
_version = operator.attrgetter("_version")
_not_none = functools.partial(operator.is_not, None)
_HOOK_DICTS = (operator.itemgetter("_forward_hooks"), operator.itemgetter("_forward_pre_hooks"))
_TENSOR_DICTS = (operator.itemgetter("_parameters"), operator.itemgetter("_buffers"))


class _AttributesOfType(dict):
    """type → the names in _READ_ATTRIBUTES that its instances have read (filled on first sight of a type)."""

    def __missing__(self, cls: type) -> tuple[str, ...]:
        names = next((names for base, names in _READ_ATTRIBUTES if issubclass(cls, base)), ())
        self[cls] = names
        return names


_attributes_of_type = _AttributesOfType()


class _IsBatchNorm(dict):
    """type → whether it is a BatchNorm (whose training flag decides how it normalises)."""

    def __missing__(self, cls: type) -> bool:
        self[cls] = issubclass(cls, nn.modules.batchnorm._BatchNorm)
        return self[cls]


_is_batchnorm = _IsBatchNorm()


def model_state(model: nn.Module) -> tuple[bool, tuple | None]:
    """(blocked, key) from one walk of `model`'s modules. blocked: a forward hook or pre-hook is registered on a
    submodule or globally (the folded path calls no submodule, so it would never fire), or a BatchNorm is in training
    mode (it normalises with the batch's statistics, which no fold can hold). key (None when blocked, or
    when an inference tensor, which keeps no version counter, is among the parameters and buffers): every submodule
    in walk order, the attributes the folded path reads (a BatchNorm's eps; a convolution's padding, stride, dilation
    and groups; a Residual's need_skip; the model's nstack) and (data_ptr, version) of every parameter and buffer.
    Two keys are equal exactly when no folded source was replaced or changed in place (the cache holds the source
    storages, so an address is not reused) and no module was replaced, added or removed, so one comparison stands for
    every layer's key and for a recorded forward. For a (2, 128, 16) model (470 modules, 742 tensors) about 0.3 ms
    with its objects in cache and 0.7–0.9 ms inside a forward that has evicted them: most steps are one C-level map."""
    if _global_hooks():
        return True, None
    modules, i = [model], 0
    while i < len(modules):  # breadth first: the list grows as it is walked
        modules += filter(_not_none, modules[i]._modules.values())
        i += 1
    dicts = [m.__dict__ for m in modules]
    if any(map(_HOOK_DICTS[0], dicts)) or any(map(_HOOK_DICTS[1], dicts)):
        return True, None
    if any(d["training"] for d, bn in zip(dicts, map(_is_batchnorm.__getitem__, map(type, modules)), strict=True)
           if bn):
        return True, None
    tensors = [t for t in chain(*(chain.from_iterable(map(dict.values, map(get, dicts))) for get in _TENSOR_DICTS))
               if t is not None]
    names = map(_attributes_of_type.__getitem__, map(type, modules))
    attributes = [d.get(name) for d, read in zip(dicts, names, strict=True) for name in read]
    try:
        versions = list(map(_version, tensors))
    except RuntimeError:  # an inference tensor keeps no version counter
        return False, None
    key = _ModelKey((modules, attributes, list(map(torch.Tensor.data_ptr, tensors)), versions))
    key.tensors = tensors
    return False, key


class _ModelKey(tuple):
    """A model key (compared as the tuple it is) that holds the tensors whose addresses it names, so that no other
    tensor can take one of those addresses while anything (a recording, the cache's last checked key) holds the key:
    a parameter replaced and freed would otherwise let a new one land at its address with the same version count
    and pass for it."""


def may_apply(model: nn.Module, backend: str) -> bool:
    """`applies` but for the hooks and BatchNorms in training mode, which `model_state` reports."""
    return (backend == "fused" and getattr(model, "folded_inference", True) and not model.training
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def applies(model: nn.Module, backend: str) -> bool:
    """Whether a forward of `model` on `backend` takes the folded path (see the module docstring)."""
    return may_apply(model, backend) and not _blocked(model)


def _conv1x1_as_matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """conv2d(x, w, b) for a 1×1 w of stride 1 on a channels_last x, as b + rows(x) @ w as [C_in, C_out]; the result
    is channels_last."""
    n, c, h, width = x.shape
    y = torch.addmm(b, x.permute(0, 2, 3, 1).reshape(n * h * width, c), w.view(w.shape[0], w.shape[1]).t())
    return y.view(n, h, width, w.shape[0]).permute(0, 3, 1, 2)


def _call(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def _bn_relu_apply(u: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(u·scale + shift) per channel, where the extension has no kernel for u's device."""
    r = torch.relu(u.to(scale.dtype) * scale[:, None, None] + shift[:, None, None]).to(u.dtype)
    return r.contiguous(memory_format=_ext.memory_format_of(u))


def _meta(value: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((t.shape, t.dtype, t.device, t.stride()) for t in value)


class _Tape:
    """The ops of one folded forward as they run: each op's function, its constant arguments (paddings, and the
    folded tensors, which are also noted by cache slot so that a refold can rebind them) and, for each tensor
    argument that an earlier op produced, that op's output slot. A tensor is recognised by identity (id and a weak
    reference), so constants never pass for intermediates."""

    def __init__(self, x: torch.Tensor, folded: dict) -> None:
        self.steps: list = []
        self.slots: dict = {id(x): (0, weakref.ref(x))}
        self.nslots = 1
        self.folded = folded  # the run's: id of a folded tensor → (cache slot, index in its value, the tensor)
        self.binds: list = []  # (step, argument index, cache slot, index in its value)
        self.packs: list = []  # (step, weight's argument index, padding, stride, dilation, groups, input shape)

    def _slot(self, t):
        if isinstance(t, torch.Tensor):
            entry = self.slots.get(id(t))
            if entry is not None and entry[1]() is t:
                return entry[0]
        return None

    def call(self, fn: Callable, *args, **kwargs):
        out = fn(*args, **kwargs)
        template, refs = list(args), []
        for i, a in enumerate(args):
            if isinstance(a, list) and any(isinstance(t, torch.Tensor) for t in a):  # torch.stack's list
                slots = [self._slot(t) for t in a]
                if any(s is None for s in slots):
                    raise RuntimeError("folded forward: a tensor list mixes intermediates and constants")
                refs.append((i, tuple(slots)))
                template[i] = None
                continue
            slot = self._slot(a)
            if slot is not None:
                refs.append((i, slot))
                template[i] = None
            elif isinstance(a, torch.Tensor):
                folded = self.folded.get(id(a))
                if folded is None or folded[2] is not a:
                    raise RuntimeError("folded forward: a tensor argument is neither an intermediate nor folded")
                self.binds.append((len(self.steps), i, folded[0], folded[1]))
        self.slots[id(out)] = (self.nslots, weakref.ref(out))
        self.steps.append((fn, template, kwargs, tuple(refs), self.nslots))
        self.nslots += 1
        return out

    def plan(self, out: torch.Tensor, model_key: tuple, recipes: dict, values: dict, kind: tuple,
             bns: list) -> _Plan:
        last_use: dict[int, int] = {}
        for n, (_, _, _, refs, _) in enumerate(self.steps):
            for _, slot in refs:
                for s in slot if isinstance(slot, tuple) else (slot,):
                    last_use[s] = n
        result = self._slot(out)
        frees: list[list[int]] = [[] for _ in self.steps]
        for s, n in last_use.items():
            if s != result:
                frees[n].append(s)
        steps = [(fn, template, kwargs, refs, slot, tuple(frees[n]))
                 for n, (fn, template, kwargs, refs, slot) in enumerate(self.steps)]
        meta = {slot: _meta(value) for slot, value in values.items()}
        return _Plan(steps, self.nslots, result, model_key, self.binds, recipes, meta, kind, bns, self.packs)


class _Plan:
    """A recorded folded forward: the same ops on a new input of the same shape, each intermediate dropped after
    its last use, without walking the modules or looking up the cache. After a change to the model's tensors (not
    its modules or their attributes), `refresh` refolds what changed and rebinds the folded constants."""

    def __init__(self, steps: list, nslots: int, result: int, model_key: tuple, binds: list, recipes: dict,
                 meta: dict, kind: tuple, bns: list, packs: list) -> None:
        self.steps, self.nslots, self.result, self.model_key = steps, nslots, result, model_key
        self.binds, self.recipes, self.meta, self.kind, self.bns = binds, recipes, meta, kind, bns
        self.structure = model_key[:2]  # the modules and their attributes: what the recorded ops depend on
        self.refreshes = 0
        self.packs = packs
        self.packed = False

    def pack(self) -> None:
        """Replace each post-op convolution's bound weight by oneDNN's prepacked copy of it for the recorded input
        shape (the same values in the blocked layout the convolution reads: each call would reorder it otherwise)."""
        with torch.inference_mode(False), torch.no_grad():
            for step, index, padding, stride, dilation, groups, shape in self.packs:
                args = self.steps[step][1]
                if not args[index].is_mkldnn:  # (packed already by a pack that was cut short, or another thread)
                    args[index] = _PACK(args[index], padding, stride, dilation, groups, shape)
        self.packed = True

    def replay(self, x: torch.Tensor) -> torch.Tensor:
        regs: list = [None] * self.nslots
        regs[0] = x
        for fn, template, kwargs, refs, slot, frees in self.steps:
            args = template.copy()
            for i, s in refs:
                args[i] = regs[s] if type(s) is int else [regs[j] for j in s]
            regs[slot] = fn(*args, **kwargs)
            for s in frees:
                regs[s] = None
        return regs[self.result]

    def unbind(self) -> None:
        """Let go of the folded constants (they are stale after a training step); `refresh` binds new ones."""
        for step, arg, _, _ in self.binds:
            self.steps[step][1][arg] = None
        self.model_key = None
        self.packed = False

    def refresh(self, cache: FoldCache, key: tuple, trusted: bool) -> bool:
        """Bring the folded constants up to date with the model's tensors: each slot's cache entry, refolded where
        its key changed (every BatchNorm's affine in one batch), then rebound into the ops. False, with nothing
        rebound, when a folded tensor would change shape, dtype, device or strides: the recorded ops no longer
        apply. On success the plan and the cache's `kind` of run are marked checked under the model key `key`.
        `trusted`: every cache entry of this kind of run is known current."""
        values, todo = {}, []
        for slot, recipe in self.recipes.items():
            entry = cache.entries.get(slot)
            if trusted and entry is not None:
                values[slot] = entry[2]
                continue
            if entry is None:  # released by a training forward: refolded, with no key to build
                todo.append((slot, recipe, None, _recipe_sources(recipe)[0]))
                continue
            sources, slot_key = _sources_key(recipe)  # None for an inference tensor (a parametrization's output)
            if slot_key is not None and entry[0] == slot_key:
                values[slot] = entry[2]
                continue
            todo.append((slot, recipe, slot_key, sources))
        if todo:
            dtype, variant = self.kind
            bns = [bn for bn in self.bns if _tracks_running_stats(bn)]
            computed = _compute([recipe for _, recipe, _, _ in todo], dtype, variant, _affines_of(bns))
            for (slot, _, slot_key, sources), value in zip(todo, computed, strict=True):
                # An entry stored without a key serves forwards under this model key (they trust the cache) and
                # is refolded by any other (its key never matches); it holds its sources' storages all the same,
                # so that no other tensor takes their addresses while the model key names them.
                cache.store(slot, slot_key, sources, value)
                values[slot] = value
        if any(_meta(value) != self.meta[slot] for slot, value in values.items()):
            return False
        for step, arg, slot, index in self.binds:
            self.steps[step][1][arg] = values[slot][index]
        self.packed = False
        self.refreshes += 1
        self.model_key = key
        cache.checked[self.kind] = key  # the plan's slots are every layer that a forward of this kind folds
        return True


class _Run:
    """One folded forward: the cache, the compute dtype and whether oneDNN's post-ops serve it."""

    def __init__(self, cache: FoldCache, x: torch.Tensor, trusted: bool, record: bool = False,
                 model: nn.Module | None = None) -> None:
        self.cache = cache
        self.model = model
        self.affines: dict | None = None  # every BatchNorm's (s, t), computed at the first layer this run refolds
        self.dtype = x.dtype
        self.format = _ext.memory_format_of(x)
        self.pointwise = pointwise_conv_available(x)
        self.matmul_1x1 = x.device.type == "cpu" and self.format == torch.channels_last
        # a recorded forward's post-op convolutions replay with prepacked weights (`_Plan.pack`)
        self.pack = (PREPACK and record and self.pointwise and self.format == torch.channels_last
                     and _PACK is not None)
        self.trusted = trusted
        self.recipes: dict = {}  # cache slot → recipe, and slot → folded tensors, of every layer this run folds
        self.values: dict = {}
        self.folded: dict = {}  # id of a folded tensor → (slot, index, tensor), for the tape
        self.tape = _Tape(x, self.folded) if record else None
        self.op = _call if self.tape is None else self.tape.call

    def _batched(self) -> dict:
        if self.affines is None:
            self.affines = {} if self.model is None else _batched_affines(self.model)
        return self.affines

    def fetch(self, recipe: tuple, dtype: torch.dtype, variant: object = None) -> tuple[torch.Tensor, ...]:
        slot, value = self.cache.get(recipe, dtype, variant, self._batched, trusted=self.trusted)
        if self.tape is not None:
            self.recipes[slot], self.values[slot] = recipe, value
            for index, t in enumerate(value):
                self.folded[id(t)] = (slot, index, t)
        return value

    def conv(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, x: torch.Tensor, *, relu: bool = False,
             add: torch.Tensor | None = None) -> torch.Tensor:
        """relu(bn(conv(x))) (relu optional) or bn(conv(x)) + add, BatchNorm folded."""
        # W' in the activations' memory format: oneDNN's post-op convolution would otherwise copy it on every call
        w, b = self.fetch(("conv", conv, bn), self.dtype, self.format)
        op = self.op
        positions = x.shape[0] * x.shape[2] * x.shape[3]
        # unpacked, a 1×1 convolution is a matrix product on every plane that does not take the post-op one
        matmul = (positions < (MATMUL_MAX_POSITIONS if self.pack else POST_OP_MIN_POSITIONS) and self.matmul_1x1
                  and w.shape[2] == w.shape[3] == 1 and conv.stride == (1, 1) and conv.padding == (0, 0)
                  and conv.groups == 1)
        if self.pointwise and not matmul and (self.pack or positions >= POST_OP_MIN_POSITIONS):
            args = (w, b, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
            if add is not None:
                # the sum lands in `add`'s own memory: every caller passes an intermediate that is dead afterwards
                add = op(torch.Tensor.contiguous, add, memory_format=self.format)
                y = op(_POINTWISE_INPLACE.binary, add, x, *args, "add", None, None, [], None)
                self._packable(2, args, x)
                return y
            y = op(_POINTWISE.default, x, *args, "relu" if relu else "none", [], None)
            self._packable(1, args, x)
            return y
        if matmul:
            # a 1×1 convolution of a channels_last plane is one matrix product of its [N·H·W, C] rows: on small
            # planes faster than oneDNN's call (its set-up dominates there)
            y = op(_conv1x1_as_matmul, x, w, b)
        else:
            y = op(F.conv2d, x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        if relu:
            y = op(torch.Tensor.relu_, y)
        if add is not None:
            y = op(torch.Tensor.add_, y, add)
        return y

    def _packable(self, index: int, args: tuple, x: torch.Tensor) -> None:
        """Note the last recorded op (a post-op convolution whose weight is its argument `index`) as one whose weight
        the recorded forward prepacks for x's shape."""
        if self.tape is not None and self.pack:
            self.tape.packs.append((len(self.tape.steps) - 1, index, *args[2:6], list(x.shape)))

    def conv_module(self, c: reference.Conv, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(c.conv, c.bn, x, relu=c.relu is not None, add=add)

    def bn_relu(self, bn: nn.BatchNorm2d, u: torch.Tensor) -> torch.Tensor:
        scale, shift = self.fetch(("bn", None, bn), u.dtype)
        if u.numel() and _ext.has_kernel("bn_relu_apply", u.device.type):
            return self.op(torch.ops.fused_hourglass.bn_relu_apply.default, u, scale, shift)
        return self.op(_bn_relu_apply, u, scale, shift)

    def residual(self, block: reference.Residual, xs: list[torch.Tensor], low: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """block(x), plus nearest_up2x(low) when given (the hourglass merge), added to the skip before conv3's
        post-op add. x comes as the one element of `xs`, which this empties: the caller holds no reference, so x is
        freed as soon as the block is done with it (and the skip tensor, an intermediate of this forward that is
        dead afterwards, takes conv3's sum in place)."""
        x = xs.pop()
        skip = self.conv_module(block.skip_layer, x) if block.need_skip else x
        if low is not None:
            skip = self.op(ops.upsample_add, low, skip)
        u = self.bn_relu(block.bn1, x)
        del x
        out = self.conv(block.conv1.conv, block.bn2, u, relu=True)
        del u
        out = self.conv(block.conv2.conv, block.bn3, out, relu=True)
        return self.conv(block.conv3.conv, None, out, add=skip)

    def hourglass(self, hg: reference.Hourglass, x: torch.Tensor) -> torch.Tensor:
        lows = [self.residual(hg.low1, [self.op(ops.max_pool2x2, x)])]
        if isinstance(hg.low2, reference.Hourglass):
            lows = [self.hourglass(hg.low2, lows.pop())]
        else:
            lows = [self.residual(hg.low2, lows)]
        return self.residual(hg.up1, [x], low=self.residual(hg.low3, lows))


def forward(model: reference.StackedHourglass, imgs: torch.Tensor, state: tuple | None = None) -> torch.Tensor:
    """The folded eval forward of `model` (a StackedHourglass): the output of the unfolded one, up to rounding.
    `state`: `model_state(model)` when the caller has just taken it (and found no hook)."""
    x = imgs.permute(0, 3, 1, 2) if model.input_format == "NHWC" else imgs
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast and model.pre[0].conv.weight.dtype != torch.float64:
        x = x.to(torch.get_autocast_dtype(device))  # as autocast's convolutions: everything in the low precision
    cache = _cache(model)
    key = (state or model_state(model))[1]
    kind = (x.dtype, _ext.memory_format_of(x))
    trusted = key is not None and cache.checked.get(kind) == key
    plan_key = (kind, tuple(x.shape), x.device, PREPACK, POST_OP_MIN_POSITIONS, MATMUL_MAX_POSITIONS)
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        plan = cache.plans.get(plan_key) if key is not None else None
        if plan is not None:
            if plan.model_key == key and trusted:
                if not plan.packed:
                    plan.pack()
                return plan.replay(x)
            # The model's tensors changed (a training step, load_state_dict, an in-place write), not its modules or
            # their attributes: refold what changed and replay, without the walk and per-layer folds of a forward.
            try:
                refreshed = plan.structure == key[:2] and plan.refresh(cache, key, trusted)
            finally:
                if plan.model_key != key:  # not refreshed (or a fold failed): the recorded ops no longer apply
                    del cache.plans[plan_key]
            if refreshed:
                return plan.replay(x)
        structure = None if key is None else key[:2]
        if cache.plans and not trusted:  # plans of other modules or attributes can never replay
            cache.plans = {k: p for k, p in cache.plans.items() if p.structure == structure}
        # The first forward of this shape records its ops (about 0.7 ms more than a plain forward, once): the next
        # ones replay them, refreshed after each training step.
        run = _Run(cache, x, trusted=trusted, record=key is not None, model=model)
        stem, block1, _, block2, block3 = model.pre
        # each intermediate is held in a one-element list that the next block empties, so that it is freed at its
        # last use (as a compiled graph frees its buffers) rather than when this frame lets go of it
        xs = [run.conv_module(stem, x)]
        xs = [run.op(ops.max_pool2x2, run.residual(block1, xs))]
        xs = [run.residual(block2, xs)]
        x = run.residual(block3, xs)
        preds_per_stack = []
        for i in range(model.nstack):
            block, conv = model.features[i]
            feature = run.conv_module(conv, run.residual(block, [run.hourglass(model.hgs[i][0], x)]))
            preds = run.conv_module(model.outs[i], feature)
            preds_per_stack.append(preds)
            if i < model.nstack - 1:
                x = run.conv_module(model.merge_preds[i].conv, preds, add=x)
                x = run.conv_module(model.merge_features[i].conv, feature, add=x)
        out = run.op(torch.stack, preds_per_stack, 1)
        if key is not None:
            cache.checked[kind] = key
        if run.tape is not None:
            while len(cache.plans) >= MAX_PLANS:  # the least recently recorded shape goes first
                del cache.plans[next(iter(cache.plans))]
            cache.plans[plan_key] = run.tape.plan(out, key, run.recipes, run.values, kind, _running_bns(model))
        return out


def fold_reference(model: nn.Module) -> reference.StackedHourglass:
    """A plain-PyTorch copy of the StackedHourglass `model` (any backend), in eval mode, with every BatchNorm that
    follows a convolution folded into it and replaced by nn.Identity: the folded path in reference ops, on model's
    device and dtype. Its state dict lacks the folded BatchNorms' keys; `model` is left unchanged."""
    config = infer_config(model.state_dict())
    weight = model.pre[0].conv.weight
    folded = reference.StackedHourglass(**config, input_format=getattr(model, "input_format", "NCHW"))
    folded.to(device=weight.device, dtype=weight.dtype).load_state_dict(model.state_dict())
    folded.eval()

    def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        w, b = fold_conv_bn(conv, bn, conv.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)

    for m in list(folded.modules()):
        if isinstance(m, reference.Residual):
            fold(m.conv1.conv, m.bn2)
            fold(m.conv2.conv, m.bn3)
            m.bn2, m.bn3 = nn.Identity(), nn.Identity()
        elif isinstance(m, reference.Conv) and m.bn is not None:
            fold(m.conv, m.bn)
            m.bn = nn.Identity()
    return folded

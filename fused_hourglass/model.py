"""The public, drop-in stacked hourglass: the reference network's module tree and state dict, with its
forward routed through the fused ops.

Backends:
  "reference"  plain PyTorch, exactly `fused_hourglass.reference`.
  "fused"      the compiled C++/CUDA ops (`fused_hourglass.ops`) around ATen/cuDNN convolutions: every
               Residual runs as three `bn_relu_conv2d` steps that save the BN inputs, not the activations;
               the convolutions followed by BatchNorm and ReLU (the stem, each stack's features) end in one
               `bn_relu`; pools are `max_pool2x2` (no saved indices); the hourglass merge is one `upsample_add`.
  "triton"     CUDA: every Residual is the Triton BN-ReLU-prologue conv chain (`fused_hourglass.triton`), the
               hourglass merge folded into up1's last convolution; each stack's head (feature Conv, prediction,
               merge) is one `fused_head`; pools and the stem's `bn_relu` as "fused".
  "auto"       "triton" for CUDA inputs when Triton is available and the model is float32, float16 or
               bfloat16, else "fused" when the extension has kernels for the input's device, else "reference".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from . import _ext, folding, ops, reference
from .checkpoint import check_compatible, infer_config, read_state_dict
from .ops.bn_relu import module_statistics_arguments
from .ops.recompute import ConvStep, bn_relu_conv_chain
from .ops.sync_bn import sync_active, sync_bn_relu, sync_bn_relu_conv2d

BACKENDS = ("auto", "reference", "fused", "triton")
RECOMPUTE = ("none", "conv1", "block")
# A recompute policy applies to the Residuals whose input planes have at least this many positions (H·W); smaller
# ones save as under "none". Their activations are a few percent of the saved bytes, while a recomputing Residual
# costs a fixed 0.1–0.2 ms more per step whatever its plane (the Python autograd Function of the chain and a small
# plane's convolution set-up): at (2, 128, 16), 128 px, batch 4, "conv1" recomputing on every plane took 1.17× the
# "none" step and 1.08× from 32×32 on (in-process A/B on two cores).
RECOMPUTE_MIN_PLANE = 32 * 32
_FUSED_OPS = ("upsample_add", "bn_relu_forward", "max_pool2x2")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the Triton conv kernels' (no float64)


def _triton():
    """The Triton package, imported on first use so that importing the model never imports triton (which must
    see TRITON_INTERPRET, when wanted, before its first import)."""
    from . import triton as fh_triton

    if not fh_triton.AVAILABLE:
        raise RuntimeError(f"StackedHourglass: backend 'triton' is unavailable: {fh_triton.UNAVAILABLE_REASON}")
    return fh_triton


def _bn_relu_conv(bn: torch.nn.BatchNorm2d, conv: torch.nn.Conv2d, u: torch.Tensor) -> torch.Tensor:
    """One Residual step. With the compiled kernel for u's device the op is called directly: it makes every check of
    the Python wrapper itself, before any running statistic is updated (about 10 µs of Python less per call)."""
    running_mean, running_var, training, momentum = module_statistics_arguments(bn)
    call = (torch.ops.fused_hourglass.bn_relu_conv2d.default if _ext.has_kernel("bn_relu_forward", u.device.type)
            else ops.bn_relu_conv2d)
    return call(u, bn.weight, bn.bias, running_mean, running_var, training, momentum, bn.eps, conv.weight, conv.bias,
                conv.padding[0])


def _add_into(out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """out + residual, written into `out` (a fresh convolution output that nothing has saved) when that gives the same
    tensor as the out-of-place sum: one allocation fewer per block."""
    if out.dtype == residual.dtype and out.shape == residual.shape and out.device == residual.device:
        return out.add_(residual)
    return out + residual


def _conv_step(bn: torch.nn.BatchNorm2d, conv: torch.nn.Conv2d) -> ConvStep:
    """The step's arguments for one forward (counting the batch in bn.num_batches_tracked, as `_bn_relu_conv`)."""
    running_mean, running_var, training, momentum = module_statistics_arguments(bn)
    return ConvStep(bn.weight, bn.bias, running_mean, running_var, training, momentum, bn.eps, conv.weight, conv.bias,
                    conv.padding[0])


class Conv(reference.Conv):
    """Reference convolution; when followed by BatchNorm and ReLU (the stem and each stack's features), those two
    run as one `bn_relu` (saving the convolution's output only) unless in reference mode."""

    mode = "reference"
    sync = None  # the process group of synchronised BatchNorm statistics, when active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync is not None and self.bn is not None and self.relu is not None and self.bn.training:
            bn = self.bn
            running_mean, running_var, _, momentum = module_statistics_arguments(bn)
            return sync_bn_relu(self.conv(x), bn.weight, bn.bias, running_mean, running_var, momentum, bn.eps,
                                process_group=self.sync, use_kernels=self.mode != "reference")
        if self.mode == "reference" or self.bn is None or self.relu is None:
            return super().forward(x)
        bn = self.bn
        return ops.bn_relu(self.conv(x), bn.weight, bn.bias, *module_statistics_arguments(bn), bn.eps)


class Residual(reference.Residual):
    """Reference bottleneck, computed as three fused BN-ReLU-conv steps ("fused") or the Triton chain.

    `recompute` (set by StackedHourglass) is the fused backend's memory policy when autograd records: "none" saves
    the three BatchNorm inputs (x, conv1's and conv2's outputs), "conv1" recomputes conv1's output from x in backward
    (`bn_relu_conv_chain` over steps 1–2), "block" recomputes conv1's and conv2's outputs, keeping only x, on planes
    of at least RECOMPUTE_MIN_PLANE positions (smaller ones save as "none"). The triton, reference and
    synchronised-BatchNorm (`_synced`) paths save as they always do."""

    mode = "reference"
    sync = None
    recompute = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync is not None:
            return self._synced(x)
        if self.mode == "triton":
            return _triton().fused_residual(self, x)
        if self.mode == "reference":
            return super().forward(x)
        residual = self.skip_layer(x) if self.need_skip else x
        if self.recompute != "none" and torch.is_grad_enabled() and x.shape[2] * x.shape[3] >= RECOMPUTE_MIN_PLANE:
            steps = [_conv_step(self.bn1, self.conv1.conv), _conv_step(self.bn2, self.conv2.conv),
                     _conv_step(self.bn3, self.conv3.conv)]
            if self.recompute == "block":
                return _add_into(bn_relu_conv_chain(x, steps), residual)
            return _add_into(ops.bn_relu_conv2d(bn_relu_conv_chain(x, steps[:2]), *steps[2]), residual)
        out = _bn_relu_conv(self.bn1, self.conv1.conv, x)
        out = _bn_relu_conv(self.bn2, self.conv2.conv, out)
        out = _bn_relu_conv(self.bn3, self.conv3.conv, out)
        return _add_into(out, residual)

    def _synced(self, x: torch.Tensor) -> torch.Tensor:
        """The three BN-ReLU-conv steps with the process group's BatchNorm statistics: the compiled statistics and
        apply kernels around the collectives on the fused and triton backends, plain PyTorch on the reference."""
        residual = self.skip_layer(x) if self.need_skip else x
        out = x
        for bn, conv in ((self.bn1, self.conv1.conv), (self.bn2, self.conv2.conv), (self.bn3, self.conv3.conv)):
            if not bn.training:
                out = conv(torch.relu(bn(out))) if self.mode == "reference" else _bn_relu_conv(bn, conv, out)
                continue
            running_mean, running_var, _, momentum = module_statistics_arguments(bn)
            out = sync_bn_relu_conv2d(out, bn.weight, bn.bias, running_mean, running_var, momentum, bn.eps,
                                      conv.weight, conv.bias, conv.padding[0], process_group=self.sync,
                                      use_kernels=self.mode != "reference")
        return out + residual


class Pool(reference.Pool):
    """2×2 max pool whose backward recomputes the argmax from the input, unless in reference mode."""

    mode = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.mode == "reference" else ops.max_pool2x2(x)


class Hourglass(reference.Hourglass):
    """Reference hourglass whose merge `up1 + up2(low3)` is one `upsample_add` ("fused") or folded into up1's
    last convolution ("triton"). The low branch runs first so that the merge costs no extra pass."""

    residual_cls = Residual
    pool_cls = Pool
    mode = "reference"
    sync = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "reference":
            return super().forward(x)
        low3 = self.low3(self.low2(self.low1(self.pool1(x))))
        if self.mode == "triton" and self.sync is None and not folding.module_hooked(self.up1):
            return _triton().fused_residual(self.up1, x, low=low3)
        return ops.upsample_add(low3, self.up1(x))


_MODAL = (Conv, Residual, Pool, Hourglass)


@torch.compiler.assume_constant_result
def _triton_available() -> bool:
    from . import triton as fh_triton

    return fh_triton.AVAILABLE


class StackedHourglass(reference.StackedHourglass):
    """Stacked hourglass (Newell et al., 2016) with the constructor and state dict of the published port.

    Args:
        nstack, inp_dim, oup_dim, bn, increase: as the port's `PoseNet`.
        backend: "auto" (default), "fused", "triton" or "reference"; see the module docstring. May be changed later
            through the `backend` attribute.
        input_format: "NCHW" (default) or "NHWC" (the port's convention).
        sync_bn: in training, BatchNorm statistics over all processes of `process_group` (an attribute; None, the
            default, means torch.distributed's default group), as torch.nn.SyncBatchNorm computes them, on every
            backend: one all-reduce of per-channel partials per BatchNorm in forward and one in backward
            (`fused_hourglass.ops.sync_bn`). Without an initialised process group, or with one process, it is plain
            BatchNorm. May be changed later through the `sync_bn` attribute. On the triton backend the Residuals
            then run as the fused backend's (the Triton chain keeps its statistics on the device).
        recompute: the fused backend's memory policy in training, "none" (default), "conv1" or "block": what each
            Residual saves for backward (see `Residual`). "none" keeps x, conv1's and conv2's outputs; "conv1"
            recomputes conv1's 1×1 output from x in backward (one more 1×1 convolution); "block" recomputes conv1's and
            conv2's outputs from x, keeping only x; both on the Residuals whose planes have at least RECOMPUTE_MIN_PLANE
            (32×32) positions, the smaller ones saving as "none". Under both, each stack's head (its 1×1 feature
            convolution, BatchNorm and ReLU, then the prediction and merge convolutions) keeps only its input too,
            recomputing the feature convolution's output. At (8, 256, 16), 256 px: 325, 212 and 161 MiB per image,
            against the eager reference's 564. Outputs, gradients and running statistics are the same under every policy
            (the recompute normalises with the forward's batch statistics and updates nothing). With a policy other than
            "none", "auto" picks "fused" over "triton" for training; the triton and reference backends, and synchronised
            BatchNorm across processes, save as with "none". May be changed later through the `recompute` attribute.
    Input [B, 3, H, W] with H, W multiples of 64; output [B, nstack, oup_dim, H/4, W/4].

    In eval mode without gradients (`torch.no_grad()`, `torch.inference_mode()`) the fused backend runs the folded
    inference path (`fused_hourglass.folding`): BatchNorms folded into the convolutions before them, ReLUs and
    additions fused into the convolutions; the `folded_inference` attribute (default True) turns it off.
    """

    residual_cls = Residual
    hourglass_cls = Hourglass
    pool_cls = Pool
    conv_cls = Conv
    folded_inference = True

    def __init__(self, nstack: int = 8, inp_dim: int = 256, oup_dim: int = 16, bn: bool = False, increase: int = 0,
                 *, backend: str = "auto", input_format: str = "NCHW", sync_bn: bool = False,
                 recompute: str = "none") -> None:
        super().__init__(nstack, inp_dim, oup_dim, bn, increase, input_format=input_format)
        self.config = {"nstack": nstack, "inp_dim": inp_dim, "oup_dim": oup_dim, "increase": increase}
        self.backend = backend
        self.recompute = recompute
        self._active: str | None = None
        self.sync_bn = sync_bn
        self.process_group = None
        self._sync_routed = None

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"StackedHourglass: backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def recompute(self) -> str:
        return self._recompute

    @recompute.setter
    def recompute(self, value: str) -> None:
        if value not in RECOMPUTE:
            raise ValueError(f"StackedHourglass: recompute must be one of {RECOMPUTE}, got {value!r}")
        self._recompute = value
        for m in self.modules():
            if isinstance(m, Residual):
                m.recompute = value

    @property
    def sync_bn(self) -> bool:
        return self._sync_bn

    @sync_bn.setter
    def sync_bn(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"StackedHourglass: sync_bn must be True or False, got {value!r}")
        self._sync_bn = value

    def sync_group(self):
        """The process group a training forward now reduces its BatchNorm statistics over, or None (sync_bn off,
        eval mode, torch.distributed not initialised, or a group of one process)."""
        import torch.distributed as dist

        group = dist.group.WORLD if self.process_group is None else self.process_group
        return group if self._sync_bn and sync_active(group, self.training) else None

    def resolve_backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        """The backend a forward on `device` runs, for parameters of `dtype` (default: the model's)."""
        if self._backend != "auto":
            return self._backend
        if dtype is None:
            dtype = next(self.parameters(), torch.empty(0)).dtype
        if (device.type == "cuda" and dtype in _TRITON_DTYPES and _triton_available()
                and (self._recompute == "none" or not self.training)):
            return "triton"
        fused = all(_ext.has_kernel(op, device.type) for op in _FUSED_OPS)
        return "fused" if fused else "reference"

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        reference.check_input(imgs, self.input_format)
        active = self.resolve_backend(imgs.device)
        if active != self._active:
            for m in self.modules():
                if isinstance(m, _MODAL):
                    m.mode = active
            self._active = active
        group = self.sync_group() if self._sync_bn else None
        if group is not self._sync_routed:
            for m in self.modules():
                if isinstance(m, _MODAL):
                    m.sync = group
            self._sync_routed = group
        if self.training:
            folding.release(self)  # the folded tensors go stale with this step; recorded eval forwards are kept
        if active == "reference":
            return super().forward(imgs)
        run = self._fused_forward
        if folding.may_apply(self, active):
            state = folding.model_state(self)  # one walk finds any hook and keys the folded weights
            if not state[0]:
                run = lambda x: folding.forward(self, x, state)  # noqa: E731
        # The fused backends run channels_last whatever the input's layout: one conversion here, at the stem, not
        # one per layout-sensitive op. The output comes back in the layout the reference gives for the same input.
        nhwc = self.input_format == "NHWC"
        if (imgs.is_contiguous() if nhwc else _ext.memory_format_of(imgs) == torch.channels_last):
            return run(imgs)
        x = imgs.contiguous() if nhwc else imgs.contiguous(memory_format=torch.channels_last)
        return run(x).contiguous()

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference forward; under a recompute policy, each stack's head (the feature convolution, its BatchNorm
        and ReLU, then the prediction and feature-merge convolutions as one convolution of their concatenated
        weights) runs as one `bn_relu_conv_chain` that saves only the head's input. On the triton backend (without
        synchronised BatchNorm), `_triton_forward`."""
        if self._active == "triton" and self._sync_routed is None and not self._heads_hooked():
            return self._triton_forward(x)
        if self._recompute == "none" or self._active != "fused" or self._sync_routed is not None or (
                not torch.is_grad_enabled()) or self._heads_hooked():
            return super().forward(x)
        x = self.pre(x.permute(0, 3, 1, 2) if self.input_format == "NHWC" else x)
        oup_dim = self.outs[0].conv.out_channels
        preds_per_stack = []
        for i in range(self.nstack):
            feature = self.features[i]
            h = feature[0](self.hgs[i](x))
            heads = [self.outs[i].conv] + ([self.merge_features[i].conv.conv] if i < self.nstack - 1 else [])
            step = _conv_step(feature[1].bn, heads[0])
            if len(heads) > 1:
                step = step._replace(conv_weight=torch.cat([c.weight for c in heads]),
                                     conv_bias=torch.cat([c.bias for c in heads]))
            conv = feature[1].conv
            y = bn_relu_conv_chain(h, [step], first_conv=(conv.weight, conv.bias, conv.padding[0]))
            # a copy: merge_preds saves its input, and a view would keep all of y alive
            preds = y[:, :oup_dim].contiguous(memory_format=_ext.memory_format_of(y))
            preds_per_stack.append(preds)
            if i < self.nstack - 1:
                x = x + self.merge_preds[i](preds) + y[:, oup_dim:]
        return torch.stack(preds_per_stack, 1)

    def _heads_hooked(self) -> bool:
        """Whether a forward hook or pre-hook (global, or on a stack head's Conv: the feature Conv, outs,
        merge_preds, merge_features, or the nn.Conv2d in one) would be skipped by the fused heads, which call the
        weights rather than those modules; the model's unfused head forward then runs, so those hooks fire. (As
        everywhere on the fused backends, a BatchNorm or ReLU module inside a Conv or Residual is not called.)"""
        heads = [*(f[1] for f in self.features), *self.outs, *self.merge_preds, *self.merge_features]
        return any(folding.module_hooked(m) for head in heads for m in (head, head.conv))

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference forward with each stack's head as one `fused_head`: the feature convolution's BatchNorm-ReLU
        is the prologue of the prediction and feature-merge convolutions (its output never written), the merge's
        additions are in their epilogues."""
        x = self.pre(x.permute(0, 3, 1, 2) if self.input_format == "NHWC" else x)
        preds_per_stack = []
        for i in range(self.nstack):
            h = self.features[i][0](self.hgs[i](x))
            merge = (x, self.merge_preds[i].conv, self.merge_features[i].conv) if i < self.nstack - 1 else ()
            preds, x = _triton().fused_head(h, self.features[i][1], self.outs[i], *merge)
            preds_per_stack.append(preds)
        return torch.stack(preds_per_stack, 1)

    @classmethod
    def from_checkpoint(cls, source: str | os.PathLike | Mapping[str, Any], **kwargs: Any) -> StackedHourglass:
        """Build a model from the port's released checkpoints ({'state_dict', 'optimizer', 'epoch'} with keys
        prefixed `model.module.`), a bare state dict, or our own checkpoints (path or loaded object).
        nstack, inp_dim, oup_dim and increase are read off the tensors; other keyword arguments (backend,
        input_format) go to the constructor."""
        state = read_state_dict(source)
        config = infer_config(state)
        clash = {k: v for k, v in kwargs.items() if k in config and v != config[k]}
        if clash:
            name, value = next(iter(clash.items()))
            raise ValueError(f"from_checkpoint: {name}={value!r} was given but the checkpoint has "
                             f"{name}={config[name]!r}")
        model = cls(**{**config, **kwargs})
        check_compatible(model, state)
        model.load_state_dict(state)
        return model

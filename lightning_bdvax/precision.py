"""bf16 training with fp32 master weights (precision ``"bf16-master"``).

Lightning's ``"bf16-mixed"`` keeps the weights in fp32 and runs matmuls under autocast: every
step casts activations back and forth around each op. ``"bf16-true"`` runs everything in bf16
but also *stores* the weights in bf16, so a small update (lr 5e-5 on a weight of size ~0.05 is
~1e-3 of it, below bf16's 2^-8 resolution) is mostly lost to rounding — and BD-VAX's signature
is made of exactly those updates.

``"bf16-master"`` is the usual remedy: the model computes in bf16 (weights, activations and
gradients), while the optimizer steps fp32 master copies, which are copied back into the bf16
weights after each step. When the fit ends the model gets its fp32 masters back, so what
callbacks read at ``on_fit_end`` (BD-VAX's Δ) is the exact fp32 update.

* :class:`MasterWeights`: the mechanism on a plain module + optimizer (also used by
  :func:`lightning_bdvax.pipeline.manual_fit`).
* :class:`BF16MasterPrecision`: the Lightning precision plugin
  (``Trainer(plugins=[BF16MasterPrecision()])``; :func:`lightning_bdvax.pipeline.make_trainer`
  builds it for ``precision="bf16-master"``).

The weights are cast when the first training step starts, not when the Trainer sets up, so a
callback's ``on_fit_start`` (e.g. :class:`~lightning_bdvax.callbacks.NeutralizeCallback`) still
edits the fp32 weights that become the masters. Edits to the weights *during* the fit must go
through the optimizer: the bf16 copies are overwritten from the masters after every step.
Buffers (e.g. rotary frequencies) keep their dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Generator, Iterator

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn

__all__ = ["MasterWeights", "BF16MasterPrecision"]


class MasterWeights:
    """Casts ``module``'s floating-point parameters to ``dtype``; keeps their fp32 values as masters.

    Parameters that an optimizer given to :meth:`attach` updates get an fp32 master (the
    original fp32 storage itself, so nothing is copied); the others (frozen weights, e.g. a LoRA
    adapter's base model) are only cast, and get their original storage back in :meth:`restore`.

    Use::

        mw = MasterWeights(model)
        mw.attach(optimizer)            # before the optimizer's first step
        loss.backward(); mw.step(optimizer); ...
        mw.restore()                    # the fp32 weights, with every update, back in the model
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be bfloat16 or float16, got {dtype}")
        self.dtype = dtype
        self._orig: dict[int, tuple[nn.Parameter, Tensor]] = {}  # id(parameter) -> (parameter, fp32 storage)
        for p in module.parameters():
            if not p.is_floating_point() or p.dtype == dtype:
                continue
            if p.dtype != torch.float32:
                raise ValueError(f"bf16-master needs fp32 parameters to keep as masters; found {p.dtype}")
            self._orig[id(p)] = (p, p.data)
            p.data = p.data.to(dtype)
        self._master_of: dict[int, nn.Parameter] = {}  # id(model parameter) -> its fp32 master
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (model parameter, master)
        self._grad_bufs: list[Tensor | None] = []  # each master's fp32 gradient buffer, kept across steps
        self.restored = False

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer`` step the fp32 masters instead of the (now bf16) parameters.

        State the optimizer already holds for a parameter (e.g. restored from a checkpoint)
        moves to its master.
        """
        for group in optimizer.param_groups:
            new = []
            for p in group["params"]:
                if id(p) in self._master_of:
                    new.append(self._master_of[id(p)])
                    continue
                if id(p) not in self._orig:  # not cast (already low precision, or integer): stepped as is
                    new.append(p)
                    continue
                master = nn.Parameter(self._orig[id(p)][1], requires_grad=p.requires_grad)
                if p in optimizer.state:
                    optimizer.state[master] = optimizer.state.pop(p)
                self._master_of[id(p)] = master
                self._pairs.append((p, master))
                self._grad_bufs.append(None)
                new.append(master)
            group["params"] = new

    def params_of(self, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
        """The low-precision parameters whose masters ``optimizer`` steps (they hold the gradients
        between backward and :meth:`grads_to_masters`)."""
        stepped = {id(m) for g in optimizer.param_groups for m in g["params"]}
        return [p for p, m in self._pairs if id(m) in stepped]

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """Move each parameter's gradient to its master, in fp32 (the parameter's gradient is cleared).

        A master keeps its fp32 gradient buffer from step to step (written in place: no new
        allocation per step); a parameter without a gradient leaves its master without one."""
        dst, src = [], []
        for i, (p, m) in enumerate(self._pairs):
            if p.grad is None:
                m.grad = None
                continue
            if self._grad_bufs[i] is None:
                self._grad_bufs[i] = torch.empty_like(m)
            m.grad = self._grad_bufs[i]  # (optimizer.zero_grad(set_to_none=True) only drops this reference)
            dst.append(m.grad)
            src.append(p.grad)
            p.grad = None
        if dst:
            torch._foreach_copy_(dst, src)

    @torch.no_grad()
    def masters_to_params(self) -> None:
        """Copy the (updated) masters into the low-precision parameters."""
        if self._pairs:
            torch._foreach_copy_([p for p, _ in self._pairs], [m for _, m in self._pairs])

    def step(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        """``grads_to_masters``, ``optimizer.step``, ``masters_to_params``."""
        self.grads_to_masters()
        out = optimizer.step(**kwargs)
        self.masters_to_params()
        return out

    def master_state(self, named: Iterator[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
        """``{name: fp32 value}`` for the named parameters that were cast (for checkpoints)."""
        return {n: self._orig[id(p)][1] for n, p in named if id(p) in self._orig}

    @torch.no_grad()
    def restore(self) -> None:
        """Give every cast parameter its fp32 storage back (for stepped ones: the master)."""
        if self.restored:
            return
        for p, t in self._orig.values():
            p.data = t
            p.grad = None
        for _, m in self._pairs:
            m.grad = None
        self._grad_bufs = [None] * len(self._pairs)
        self.restored = True


class BF16MasterPrecision(Precision):
    """Lightning precision plugin: bf16 weights, activations and gradients, fp32 master weights.

    ``Trainer(plugins=[BF16MasterPrecision()])``, or ``precision="bf16-master"`` wherever this
    package builds the Trainer. See the module docstring for what it does and why.
    Gradient clipping acts on the bf16 gradients before they move to the masters;
    checkpoints written during the fit hold the fp32 masters.
    """

    precision = "bf16-master"

    def __init__(self) -> None:
        super().__init__()
        self._module: nn.Module | None = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._masters: MasterWeights | None = None

    def connect(self, model, optimizers, lr_schedulers):
        self._module = model
        self._optimizers = list(optimizers)
        self._masters = None
        return model, optimizers, lr_schedulers

    def _ensure_cast(self) -> None:
        if self._masters is None or self._masters.restored:
            if self._module is None:
                raise RuntimeError("BF16MasterPrecision: no module connected (is it used outside a Trainer?)")
            self._masters = MasterWeights(self._module, torch.bfloat16)
            for opt in self._optimizers:
                self._masters.attach(opt)

    @contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        self._ensure_cast()
        yield

    def optimizer_step(self, optimizer, model, closure: Callable[[], Any], **kwargs: Any) -> Any:
        self._ensure_cast()
        # As Lightning's MixedPrecision plugin does: run the closure (forward, backward), then the
        # on_before_optimizer_step hooks and clipping (on the bf16 gradients), then step.
        closure_result = closure()
        self._after_closure(model, optimizer)
        skipped = closure_result is None
        if isinstance(model, nn.Module) and getattr(model, "automatic_optimization", True) and skipped:
            self._masters.grads_to_masters()  # nothing to step; drop stale gradients
            return closure_result
        self._masters.step(optimizer, **kwargs)
        return closure_result

    def main_params(self, optimizer):  # what gradient clipping sees: the parameters holding grads
        if self._masters is None:
            return super().main_params(optimizer)
        return self._masters.params_of(optimizer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._masters is None or self._masters.restored or self._module is None:
            return
        sd = checkpoint.get("state_dict")
        if isinstance(sd, dict):
            for name, value in self._masters.master_state(self._module.named_parameters()).items():
                if name in sd:
                    sd[name] = value.detach().clone()

    def teardown(self) -> None:
        if self._masters is not None:
            self._masters.restore()
        super().teardown()

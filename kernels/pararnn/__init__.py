"""ParaRNN: Newton-iteration parallel solution of nonlinear RNNs (Danieli et al., 2025).

``solve`` runs a cell h_l = f(h_{l-1}, x_l) over whole sequences by Newton's method with a
parallel linear-recurrence solve per step; ``linear_scan`` is that linear recurrence (usable on
its own). ParaGRU / ParaLSTM cell functions are in ``cells``. Nothing here imports the trainer.
``IMPLS`` are the ``impl`` values of both (``paxlike.kernels.platform``), ``FALLBACKS`` those of
``solve(fallback=...)``. See docs/pararnn.md.
"""

from . import cells
from .scan import IMPLS, choose_impl, linear_scan
from .solver import FALLBACKS, JACOBIANS, ConvergenceWarning, default_tol, solve

__all__ = ["solve", "linear_scan", "choose_impl", "ConvergenceWarning", "default_tol", "cells",
           "IMPLS", "FALLBACKS", "JACOBIANS"]

"""Adaptive local mean teacher (ALMT) for OGEN's self-distillation.

OGEN's public code leaves ALMT out, so this is our design (DESIGN.md section 4):

- ``update(student, progress)`` snapshots the student's floating-point state (parameters and
  float buffers) and keeps the last ``m_max`` snapshots;
- the window ``m_i = round(m_min + (m_max - m_min) * progress)`` grows linearly over training;
- the teacher is the EMA of the last ``m_i`` snapshots, normalized within the window:
  ``theta_T = sum_j a^(m-1-j) theta_j / sum_j a^(m-1-j)`` (j = 0 oldest .. m-1 newest,
  a = ``momentum``; a = 1 is the plain local mean);
- distillation is ``T^2 KL(softmax(t / T) || softmax(s / T))`` per row, batch-averaged.

Defaults: m_min 2, m_max 8 snapshots (take one per epoch or per N steps), momentum 0.9,
temperature 2.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validation as V


def distillation_loss(student_logits, teacher_logits, temperature=2.0):
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over rows.

    Args: student_logits, teacher_logits ``[B, K]`` float (teacher treated as constant).
    Returns: scalar in the student's dtype.

    Example::

        loss = distillation_loss(100 * x @ w.T, 100 * x @ w_teacher.T, temperature=2.0)
        loss.backward()
    """
    T = V.check_positive("temperature", temperature)
    V.check_matrix("student_logits", student_logits, "[B, K]")
    V.check_matrix("teacher_logits", teacher_logits, "[B, K]")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have one shape [B, K]")
    acc = torch.promote_types(student_logits.dtype, torch.float32)  # fp32 at least, fp64 kept
    log_s = F.log_softmax(student_logits.to(acc) / T, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().to(acc) / T, dim=1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    return (kl * T * T).to(student_logits.dtype)


class LocalMeanTeacher(nn.Module):
    """A teacher = EMA of the student over a window of its last m_i snapshots (m_i grows).

    Args:
        student: the module to follow (copied once for the teacher's structure).
        m_min, m_max: window size at the start and end of training, in snapshots.
        momentum: EMA factor a in (0, 1] inside the window (1 = uniform mean).
        temperature: distillation temperature T.
    ``forward`` runs the teacher copy; ``state_dict`` holds the teacher's weights and, as extra
    state, the snapshots, so a checkpoint round-trips.

    Example::

        teacher = LocalMeanTeacher(prompt_learner, m_min=2, m_max=8)
        teacher.update(prompt_learner, progress=epoch / epochs)     # once per epoch
        loss = loss + teacher.distillation_loss(student_logits, teacher_logits)
    """

    def __init__(self, student: nn.Module, m_min: int = 2, m_max: int = 8, momentum: float = 0.9,
                 temperature: float = 2.0):
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        for name, v in (("m_min", m_min), ("m_max", m_max)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if m_min > m_max:
            raise ValueError(f"m_min ({m_min}) must not exceed m_max ({m_max})")
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1], got {momentum!r}")
        self.m_min, self.m_max, self.momentum = m_min, m_max, float(momentum)
        self.temperature = V.check_positive("temperature", temperature)
        self.model = copy.deepcopy(student).requires_grad_(False)
        self.snapshots = []  # list of {name: tensor}, oldest first
        self.window = 0      # m_i used by the last update

    def window_size(self, progress: float) -> int:
        """``m_i = round(m_min + (m_max - m_min) * clamp(progress, 0, 1))``."""
        p = min(max(float(progress), 0.0), 1.0)
        return int(round(self.m_min + (self.m_max - self.m_min) * p))

    @torch.no_grad()
    def update(self, student: nn.Module, progress: float) -> int:
        """Snapshot ``student`` and rebuild the teacher; returns the window size used."""
        state = student.state_dict()
        mine = self.model.state_dict()
        if state.keys() != mine.keys():
            raise ValueError("student's state_dict keys differ from the teacher's: pass the module "
                             "the teacher was built from")
        self.snapshots.append({n: t.detach().clone() for n, t in state.items() if t.is_floating_point()})
        del self.snapshots[:-self.m_max]
        window = self.snapshots[-self.window_size(progress):]
        m = len(window)
        weights = [self.momentum ** (m - 1 - j) for j in range(m)]
        norm = sum(weights)
        for name, target in mine.items():
            if not target.is_floating_point():
                target.copy_(state[name])
                continue
            acc = torch.zeros_like(target, dtype=torch.float64 if target.dtype == torch.float64 else torch.float32)
            for w, snap in zip(weights, window):
                acc.add_(snap[name], alpha=w / norm)
            target.copy_(acc)
        self.window = m
        return m

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def distillation_loss(self, student_logits, teacher_logits):
        """``distillation_loss(student_logits, teacher_logits, self.temperature)``."""
        return distillation_loss(student_logits, teacher_logits, self.temperature)

    def get_extra_state(self):
        return {"snapshots": [{n: t.clone() for n, t in s.items()} for s in self.snapshots],
                "window": self.window, "m_min": self.m_min, "m_max": self.m_max,
                "momentum": self.momentum, "temperature": self.temperature}

    def set_extra_state(self, state):
        self.snapshots = [{n: t.clone() for n, t in s.items()} for s in state["snapshots"]]
        self.window = state["window"]
        self.m_min, self.m_max = state["m_min"], state["m_max"]
        self.momentum, self.temperature = state["momentum"], state["temperature"]

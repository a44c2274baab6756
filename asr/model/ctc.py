"""A CTC loss that never waits for the device: torch's `ctc_loss` (reduction="mean", zero_infinity=True) as
batched tensor ops over time.

torch's CUDA kernel makes blocking copies of the lengths and the target offsets (6 synchronising calls per
update, measured on an H200). Here the lengths are device tensors used only as masks and
gather indices, every shape comes from the inputs' shapes, and nothing is read back: no `.item()`, no
`.tolist()`, no boolean indexing, no data-dependent shape (it runs on the meta device, tests/test_ctc.py).

The recursion runs over the extended label sequence (blank, l1, blank, l2, ..., lL, blank: S = 2L+1 states),
in log space, one step per frame for the whole batch:
- alpha_t(s): log probability of frames 0..t ending in state s. A clip's negative log-likelihood (nll) is
  read at its last frame, in its final states 2L and 2L-1.
- beta_t(s): log probability of frames t..end given state s at t. It is the alpha of the clip reversed in
  time and in states (all clips then start at frame 0), so one recursion serves both, run as one batch of
  2B in the forward pass when a gradient is wanted.
- The gradient: d nll / d log_probs[t, c] = -(occupation of the states labelled c at frame t), where the
  occupation exp(alpha + beta - emission + nll) is the posterior of the state. torch's kernel returns that
  plus softmax(log_probs) (the gradient through a log_softmax it assumes); through `log_softmax` both give
  the same gradient of the logits. The backward pass is analytic, so autograd saves nothing per frame
  (autograd through the loop took 10-70x longer on a CPU: benchmarks/ctc.py autograd=true).
A clip's frames past its length and states past 2L are computed alike but never read.

Cost: 4 elementwise ops on (S+2, 2B) per frame (one loop, alpha and beta together), ~10 vectorised ops on
(T, S, B), and 3x the memory of a (T, S, B) float32 tensor kept from forward to backward. On a CPU the loss
and its gradient take about twice torch's time; on a GPU that loop is ~4 kernel launches per frame (not
measured yet). It traces into one graph with torch.compile, but the loop unrolls (T=500: 34 s to trace):
CUDA graphs over fixed batch shapes, or a Triton kernel, are the ways to fewer launches.
"""

import torch

from asr import SetupError

NEG_INF = float("-inf")


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
             target_lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """torch.nn.functional.ctc_loss(..., reduction="mean", zero_infinity=True): each clip's nll divided by
    its label length (at least 1), averaged over the batch; a clip without a feasible alignment (too few
    frames for its labels) counts 0 and gets no gradient.

    log_probs: (T, B, V) log-softmax outputs, float32 or float64. targets: (B, L) label ids, padding past a
    clip's label length any valid id. input_lengths (frames, each at least 1) and target_lengths: (B,)
    integer tensors on log_probs' device (`to_device` puts host lengths there without a sync)."""
    frames, labels = input_lengths.long(), target_lengths.long()
    states, skip = _extended(targets, blank)
    by_state = log_probs.transpose(1, 2)  # (T, V, B): every tensor below is (T, S, B), clips innermost
    emit = by_state.gather(1, states.expand(log_probs.shape[0], -1, -1))  # log prob of each state's label
    if not (torch.is_grad_enabled() and emit.requires_grad):  # evaluation: the forward recursion only
        nll = _nll(_alphas(emit, skip)[:-1, 2:], frames, labels)
    else:
        nll = _CTC.apply(emit, skip, *_reversed(by_state, targets, frames, labels, blank), frames, labels)
    nll = torch.where(torch.isinf(nll), 0.0, nll)
    return (nll / labels.clamp(min=1).to(nll.dtype)).mean()


IMPLEMENTATIONS = ("torch", "tensor", "auto")


def use_tensor_ops(implementation: str, device: torch.device) -> bool:
    """Whether `model.ctc_loss` picks this module's loss for `device`: tensor, or auto on CUDA (where torch's
    synchronises; on a CPU torch's takes about half the time, benchmarks/ctc.py). SetupError for another value."""
    if implementation not in IMPLEMENTATIONS:
        raise SetupError(f"model.ctc_loss={implementation!r}: expected one of {', '.join(IMPLEMENTATIONS)}.")
    return implementation == "tensor" or (implementation == "auto" and device.type == "cuda")


def to_device(*values, device: torch.device) -> torch.Tensor:
    """Host integer sequences of one length (lists, arrays, CPU tensors) as one (len(values), B) int64 tensor
    on `device`, copied without making the host wait: on CUDA through pinned memory with a non-blocking
    copy (a blocking copy synchronises)."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.int64) for v in values])
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _reversed(by_state: torch.Tensor, targets: torch.Tensor, frames: torch.Tensor, labels: torch.Tensor, blank: int):
    """Each clip reversed in time and in states, for beta: its emissions (T, S, B) and skip weights (S, B)
    (those of its labels reversed), and the index maps both ways: (T, 1, B) frame T_b-1-t and (1, S, B) state
    2L_b-s, negative out of the clip's range."""
    time_steps, states = by_state.shape[0], 2 * targets.shape[1] + 1
    reversed_frame = (frames - 1 - torch.arange(time_steps, device=frames.device)[:, None])[:, None]
    positions = torch.arange(states, device=frames.device)[:, None]
    reversed_labels = targets.gather(1, (labels - 1 - positions[: states // 2]).clamp(min=0).T)  # L_b-1-k
    reversed_states, reversed_skip = _extended(reversed_labels, blank)
    reversed_emit = by_state.detach().gather(0, reversed_frame.clamp(min=0).expand(-1, by_state.shape[1], -1))
    reversed_emit = reversed_emit.gather(1, reversed_states.expand(time_steps, -1, -1))
    return reversed_emit, reversed_skip, reversed_frame, (2 * labels - positions)[None]


class _CTC(torch.autograd.Function):
    """(B,) nll from the state emissions `emit` (T, S, B); the gradient from alpha and beta, without autograd.
    The reversed clips (`_reversed`) are constants: the gradient flows through `emit`."""

    @staticmethod
    def forward(ctx, emit, skip, reversed_emit, reversed_skip, reversed_frame, reversed_state, frames, labels):
        padded = _alphas(torch.cat([emit, reversed_emit], 2), torch.cat([skip, reversed_skip], 1))
        alphas, reversed_padded = padded[:-1, 2:, : emit.shape[2]], padded[:, :, emit.shape[2]:]
        nll = _nll(alphas, frames, labels)
        ctx.save_for_backward(emit, alphas, reversed_padded, reversed_frame, reversed_state, nll)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        emit, alphas, reversed_padded, reversed_frame, reversed_state, nll = ctx.saved_tensors
        time_steps, states = emit.shape[:2]
        # beta (frame t's emission included): the reversed clips' alpha, read at -inf out of a clip's range (the
        # impossible frame T and states -2, -1 of the padding), so the occupation there is 0
        frame = torch.where(reversed_frame < 0, time_steps, reversed_frame).expand(-1, states + 2, -1)
        state = (reversed_state + 2).clamp(min=0).expand(time_steps, -1, -1)
        betas = reversed_padded.gather(0, frame).gather(1, state)
        # An infeasible clip (nll inf) has alpha + beta = -inf everywhere: occupation 0, not nan.
        occupation = betas.add_(alphas).sub_(emit).add_(torch.where(torch.isinf(nll), 0.0, nll)).exp_()
        return occupation.mul_(-grad_nll), *[None] * 7


def _extended(targets: torch.Tensor, blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, S, B) label id of each state (blank, l1, blank, ..., lL, blank), and (S, B) log weight of the
    skip from state s-2 to s: 0 where allowed (s a label other than the one two states back), -inf elsewhere."""
    batch, length = targets.shape
    states = torch.full((2 * length + 1, batch), blank, dtype=torch.int64, device=targets.device)
    states[1::2] = targets.T
    skip = torch.full(states.shape, NEG_INF, device=targets.device)
    skip[3::2] = torch.where(targets.T[1:] != targets.T[:-1], 0.0, NEG_INF)  # states 3, 5, ...: l2 on
    return states[None], skip


def _nll(alphas: torch.Tensor, frames: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) nll of each clip: -alpha at its last frame, in its final states 2L and 2L-1 (none without labels)."""
    last = alphas.gather(0, (frames - 1).expand(1, alphas.shape[1], -1))[0]  # (S, B)
    positions = torch.arange(alphas.shape[1], device=alphas.device)[:, None]
    final = (positions == 2 * labels) | (positions == 2 * labels - 1)
    return -torch.logsumexp(last.masked_fill(~final, NEG_INF), 0)


def _alphas(emit: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """(T+1, S+2, B) alpha_t(s) at [t, s+2], from the emissions (T, S, B) and the skip weights (S, B). Frame T
    and states -2, -1 are impossible (-inf): the recursion's shifts read them, and so can gathers out of a
    clip's range."""
    frames, states, batch = emit.shape
    padded = emit.new_empty((frames + 1, states + 2, batch))
    padded[:, :2] = NEG_INF
    padded[0, 2:] = NEG_INF
    padded[-1] = NEG_INF
    padded[0, 2:4] = emit[0, :2]  # a path starts in the blank or in the first label
    for t in range(1, frames):
        _alpha_step(padded[t - 1], emit[t], skip, out=padded[t, 2:])
    return padded


def _alpha_step(previous: torch.Tensor, emit: torch.Tensor, skip: torch.Tensor, out: torch.Tensor) -> None:
    """alpha_t into `out` (S, B) from alpha_{t-1} (`previous`, (S+2, B) after two -inf states): stay in s,
    come from s-1, or skip from s-2 where allowed; then frame t's emission. Every view is contiguous."""
    paths = torch.logaddexp(previous[2:], previous[1:-1])
    torch.logaddexp(paths, previous[:-2] + skip, out=paths)
    torch.add(paths, emit, out=out)

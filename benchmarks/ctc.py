"""torch's ctc_loss against asr.model.ctc on this machine's CPU: time of loss + backward, and how far apart they are.

    python benchmarks/ctc.py [shapes=[[T,B,V,L],...]] [repeats=5] [autograd=true]

Per shape (frames, clips, vocabulary, longest label; frame counts and label lengths drawn down to half of
those): milliseconds of loss + backward through log_softmax (as CTCModel computes it), the fastest of
`repeats` runs, for torch's `ctc_loss` (reduction="mean", zero_infinity=True) and `asr.model.ctc.ctc_loss`; the
forward alone (evaluation, under no_grad); the largest difference of the loss and of the logits gradient
between the two in float32, and of each from the float64 values. autograd=true adds the first version: the
same forward recursion with autograd through the loop over frames instead of the analytic backward. The
settings and their defaults (the shapes): conf/bench/ctc.yaml (`--help`).
"""

import sys
import time
from pathlib import Path

import torch
from omegaconf import ListConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from asr.model import ctc  # noqa: E402
from asr.tools import cli  # noqa: E402


def batch(frames: int, clips: int, vocab: int, length: int, seed: int = 0):
    """(T, B, V) logits, (B, L) targets, (B,) frame counts and label lengths; the first clip has both maxima."""
    generator = torch.Generator().manual_seed(seed)
    input_lengths = torch.randint(frames // 2, frames + 1, (clips,), generator=generator)
    target_lengths = torch.randint(length // 2, length + 1, (clips,), generator=generator)
    input_lengths[0], target_lengths[0] = frames, length
    targets = torch.randint(0, vocab - 1, (clips, length), generator=generator)  # the blank is last
    return 3 * torch.randn(frames, clips, vocab, generator=generator), targets, input_lengths, target_lengths


def torch_loss(log_probs, targets, input_lengths, target_lengths, blank):
    return torch.nn.functional.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=blank,
                                        reduction="mean", zero_infinity=True)


def autograd_loss(log_probs, targets, input_lengths, target_lengths, blank):
    """asr.model.ctc's forward recursion, out of place, differentiated by autograd: it saves tensors at every frame."""
    states, skip = ctc._extended(targets, blank)
    emit = log_probs.transpose(1, 2).gather(1, states.expand(log_probs.shape[0], -1, -1))  # (T, S, B)
    alpha = torch.full_like(emit[0], ctc.NEG_INF)
    alpha = torch.cat([emit[0, :2], alpha[2:]])
    alphas = [alpha]
    for t in range(1, emit.shape[0]):
        padded = torch.nn.functional.pad(alpha, (0, 0, 2, 0), value=ctc.NEG_INF)
        alpha = torch.logaddexp(torch.logaddexp(alpha, padded[1:-1]), padded[:-2] + skip) + emit[t]
        alphas.append(alpha)
    nll = ctc._nll(torch.stack(alphas), input_lengths.long(), target_lengths.long())
    nll = torch.where(torch.isinf(nll), 0.0, nll)
    return (nll / target_lengths.clamp(min=1)).mean()


def run(loss_fn, logits, *rest, blank: int, backward: bool = True) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(seconds, loss, logits gradient) of one loss (+ backward) through log_softmax."""
    logits = logits.clone().requires_grad_(backward)
    started = time.perf_counter()
    with torch.set_grad_enabled(backward):
        loss = loss_fn(logits.log_softmax(-1), *rest, blank)
        if backward:
            loss.backward()
    return time.perf_counter() - started, loss.detach(), logits.grad


def fastest(loss_fn, data, blank: int, repeats: int, backward: bool = True) -> float:
    """Milliseconds, the fastest of `repeats` runs after one warm-up."""
    return 1e3 * min(run(loss_fn, *data, blank=blank, backward=backward)[0] for _ in range(repeats + 1))


def main(argv: list[str]) -> list[dict]:
    args, _ = cli.parse("bench/ctc", argv)
    if not all(isinstance(shape, ListConfig) and len(shape) == 4 for shape in args.shapes):
        sys.exit("error: shapes: a list of [frames,clips,vocabulary,longest label], e.g. shapes=[[500,16,40,150]]")
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; ms of loss + backward (fastest of "
          f"{args.repeats}), forward alone under no_grad; largest differences in float32 (loss relative, logits "
          f"gradient absolute, and each one's gradient error against float64)\n")
    header = (f"{'T,B,V,L':<16} {'torch':>7} {'ours':>7} {'ratio':>6} {'fwd torch':>9} {'fwd ours':>8} "
              f"{'autograd':>8} {'loss rel':>9} {'grad abs':>9} {'torch err':>9} {'ours err':>9}")
    print(header)
    rows = []
    for frames, clips, vocab, length in args.shapes:
        shape = f"{frames},{clips},{vocab},{length}"
        data = batch(frames, clips, vocab, length)
        blank = vocab - 1
        row = {"shape": shape, "torch_ms": fastest(torch_loss, data, blank, args.repeats),
               "ours_ms": fastest(ctc.ctc_loss, data, blank, args.repeats),
               "torch_forward_ms": fastest(torch_loss, data, blank, args.repeats, backward=False),
               "ours_forward_ms": fastest(ctc.ctc_loss, data, blank, args.repeats, backward=False),
               "autograd_ms": fastest(autograd_loss, data, blank, 1) if args.autograd else None}
        _, theirs, their_grad = run(torch_loss, *data, blank=blank)
        _, ours, our_grad = run(ctc.ctc_loss, *data, blank=blank)
        _, _, exact = run(torch_loss, data[0].double(), *data[1:], blank=blank)
        row |= {"loss_rel": ((ours - theirs) / theirs).abs().item(),
                "grad_abs": (our_grad - their_grad).abs().max().item(),
                "torch_grad_error": (their_grad.double() - exact).abs().max().item(),
                "ours_grad_error": (our_grad.double() - exact).abs().max().item()}
        rows.append(row)
        autograd = f"{row['autograd_ms']:>8.0f}" if args.autograd else f"{'-':>8}"
        print(f"{shape:<16} {row['torch_ms']:>7.1f} {row['ours_ms']:>7.1f} {row['ours_ms'] / row['torch_ms']:>5.1f}x "
              f"{row['torch_forward_ms']:>9.1f} {row['ours_forward_ms']:>8.1f} {autograd} {row['loss_rel']:>9.1e} "
              f"{row['grad_abs']:>9.1e} {row['torch_grad_error']:>9.1e} {row['ours_grad_error']:>9.1e}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

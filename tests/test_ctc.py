"""asr.model.ctc: torch's ctc_loss (reduction="mean", zero_infinity=True) as tensor ops over time. The same loss and
logits gradient as torch's in float32, and nothing read back from the device; the model option that picks it."""

import pytest
import torch

from asr import SetupError
from asr.model import ctc
from asr.model.module import CTCModel
from tests.conftest import compose_config
from tests.test_model import DeviceReads

# (frames, labels) per clip, padded to 40 frames and 12 labels: a clip of every length, repeated labels (a
# repeat needs a blank between), one without labels, two infeasible (labels need more frames than there are:
# zero_infinity gives loss 0, gradient 0), one feasible with no frame to spare, one of a single frame.
CLIPS = [(40, [1, 2, 2, 3, 1, 1, 4, 2, 3, 3, 1, 2]), (25, [3, 3, 1, 2, 2]), (10, []), (5, [1, 2, 3, 4, 1, 2]),
         (4, [2, 2, 2]), (5, [2, 2, 2]), (1, [3]), (33, [4, 1, 3, 2, 4, 1, 3])]
INFEASIBLE = [3, 4]


def _batch(clips, vocab: int, seed: int = 0):
    """(T, B, V) logits, (B, L) targets padded with 0 (CTCModel's clamped -100), (B,) frames and label lengths.
    Label ids are 1..4: neither blank (0 or V-1)."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.zeros(len(clips), max(len(ids) for _, ids in clips), dtype=torch.long)
    for i, (_, ids) in enumerate(clips):
        targets[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    logits = 3 * torch.randn(max(t for t, _ in clips), len(clips), vocab, generator=generator)
    return logits, targets, torch.tensor([t for t, _ in clips]), torch.tensor([len(ids) for _, ids in clips])


def _random_batch(frames: int, batch: int, vocab: int, length: int, seed: int = 0):
    """A realistic batch: frame counts and label lengths drawn (the longest clip has both maxima), blank last."""
    generator = torch.Generator().manual_seed(seed)
    input_lengths = torch.randint(frames // 2, frames + 1, (batch,), generator=generator)
    target_lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    input_lengths[0], target_lengths[0] = frames, length
    targets = torch.randint(0, vocab - 1, (batch, length), generator=generator)
    logits = 3 * torch.randn(frames, batch, vocab, generator=generator)
    return logits, targets, input_lengths, target_lengths


def _loss_and_grad(loss_fn, logits, targets, input_lengths, target_lengths, blank, **options):
    """The loss and its gradient with respect to the logits, through log_softmax (as CTCModel computes it)."""
    logits = logits.clone().requires_grad_()
    loss = loss_fn(logits.log_softmax(-1), targets, input_lengths, target_lengths, blank=blank, **options)
    loss.backward()
    return loss.detach(), logits.grad


def _torch(*batch, blank):
    return _loss_and_grad(torch.nn.functional.ctc_loss, *batch, blank, reduction="mean", zero_infinity=True)


@pytest.mark.parametrize("blank", ["last", "first"])
def test_loss_and_gradient_equal_torchs(blank):
    """Blank last (the project's [PAD]) and blank 0; padding in frames and labels, repeats, no labels,
    infeasible clips."""
    vocab = 6
    blank = vocab - 1 if blank == "last" else 0
    batch = _batch(CLIPS, vocab)
    logits, targets, input_lengths, target_lengths = batch
    every = torch.nn.functional.ctc_loss(logits.log_softmax(-1), targets, input_lengths, target_lengths, blank=blank,
                                         reduction="none")
    assert every.isinf().nonzero().flatten().tolist() == INFEASIBLE  # the batch holds what it claims
    loss, grad = _loss_and_grad(ctc.ctc_loss, *batch, blank)
    torch_loss, torch_grad = _torch(*batch, blank=blank)
    torch.testing.assert_close(loss, torch_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, torch_grad, rtol=1e-4, atol=1e-6)
    for clip, (frames, _) in enumerate(CLIPS):
        assert not grad[frames:, clip].any()  # past the clip's frames
        # zero_infinity: no gradient from a clip without an alignment
        assert grad[:, clip].any() == (clip not in INFEASIBLE)


def test_on_long_clips_as_accurate_as_torchs_and_equal_in_float64():
    """10 s clips (500 frames at 50 frames/s) with up to 150 characters, and 20 s with 300. In float32 the
    log-space sums (~1e3) round the gradient to ~1e-3 of its largest value in both implementations: ours
    stays within 2x of torch's own float32 error against float64 values, and in float64 the two agree."""
    for shape in [(500, 16, 40, 150), (1000, 4, 40, 300)]:
        logits, *lengths = _random_batch(*shape)
        blank = shape[2] - 1
        exact_loss, exact_grad = _torch(logits.double(), *lengths, blank=blank)
        loss, grad = _loss_and_grad(ctc.ctc_loss, logits.double(), *lengths, blank)
        torch.testing.assert_close(loss, exact_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, exact_grad, rtol=1e-9, atol=1e-12)
        loss, grad = _loss_and_grad(ctc.ctc_loss, logits, *lengths, blank)
        torch_loss, torch_grad = _torch(logits, *lengths, blank=blank)
        torch.testing.assert_close(loss, torch_loss, rtol=1e-5, atol=0)
        assert (grad.double() - exact_grad).abs().max() <= 2 * (torch_grad.double() - exact_grad).abs().max()


def test_the_analytic_gradient_is_the_losss_derivative():
    """In float64 against finite differences: the beta recursion's gradient, not torch's, is checked here."""
    clips = [(7, [1, 1, 2]), (5, [3]), (6, []), (2, [1, 2])]
    logits, targets, input_lengths, target_lengths = _batch(clips, 5, seed=1)
    logits = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: ctc.ctc_loss(x.log_softmax(-1), targets, input_lengths, target_lengths, blank=4), (logits,))


def test_evaluation_runs_the_forward_recursion_alone_to_the_same_loss():
    batch = _batch(CLIPS, 6)
    with torch.no_grad():
        evaluated = ctc.ctc_loss(batch[0].log_softmax(-1), *batch[1:], blank=5)
    trained, _ = _loss_and_grad(ctc.ctc_loss, *batch, 5)
    torch.testing.assert_close(evaluated, trained, rtol=1e-6, atol=0)


def test_loss_and_backward_read_nothing_back_from_the_device():
    """With the lengths as tensors, no dispatched op reads a value (torch's ctc_loss on a CPU reads the
    lengths directly, where the dispatcher does not see it). On the meta device, where no value exists, the
    loss and its gradient still run: nothing in them depends on a value on the host."""
    logits, targets, input_lengths, target_lengths = _batch(CLIPS, 6)
    logits.requires_grad_()
    with DeviceReads() as mode:
        ctc.ctc_loss(logits.log_softmax(-1), targets, input_lengths, target_lengths, blank=5).backward()
    assert mode.reads == []
    meta = [t.to("meta") for t in (logits.detach(), targets, input_lengths, target_lengths)]
    meta[0].requires_grad_()
    ctc.ctc_loss(meta[0].log_softmax(-1), *meta[1:], blank=5).backward()
    assert meta[0].grad.shape == logits.shape and meta[0].grad.device.type == "meta"


def test_the_model_option_picks_the_loss_with_equal_results(monkeypatch):
    """CTCModel.ctc_loss with model.ctc_loss=tensor: torch's loss and CTC-head gradient, no device read;
    auto picks it on CUDA only; another value is named with the valid ones."""
    cfg = compose_config(overrides=["model.ctc_loss=tensor", "model.config.mask_time_prob=0"])
    vocab = list("abcde") + ["|", "[UNK]", "[PAD]"]
    torch.manual_seed(0)
    model = CTCModel.from_config(cfg, vocab).eval()
    lengths = [16000, 9000, 12000]
    labels = torch.tensor([[0, 1, 1, 2, 5], [3, 3, -100, -100, -100], [4, 2, 0, 1, -100]])
    batch = {"audio": torch.randn(3, 16000), "lengths": lengths, "labels": labels, "label_lengths": [5, 2, 4]}
    out = model(batch)
    logits = out.logits
    calls, ctc_loss = [], ctc.ctc_loss
    monkeypatch.setattr(ctc, "ctc_loss", lambda *args, **kwargs: calls.append(1) or ctc_loss(*args, **kwargs))
    results = {}
    for implementation in ("tensor", "torch"):
        model.hparams.ctc_loss = implementation
        with DeviceReads() as mode:
            loss = model.ctc_loss(logits, out.frames, batch)
            grad = torch.autograd.grad(loss, model.model.lm_head.weight, retain_graph=True)[0]
        results[implementation] = loss, grad, mode.reads
    assert len(calls) == 1  # tensor took asr.model.ctc's loss, torch did not
    assert results["tensor"][2] == []
    torch.testing.assert_close(results["tensor"][0], results["torch"][0], rtol=1e-5, atol=0)
    ours, theirs = results["tensor"][1], results["torch"][1]  # sums over frames: compared to their scale
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert [ctc.use_tensor_ops("auto", torch.device(d)) for d in ("cpu", "cuda")] == [False, True]
    with pytest.raises(SetupError, match="model.ctc_loss='cudnn': expected one of torch, tensor, auto"):
        ctc.use_tensor_ops("cudnn", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_no_call_synchronises_and_the_loss_is_torchs():
    """torch's CUDA kernel copies the lengths with blocking copies; ours, lengths from the host included
    (`to_device`), makes no synchronising call."""
    batch = _random_batch(500, 16, 40, 150)
    device = torch.device("cuda")
    logits, targets = batch[0].to(device), batch[1].to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        input_lengths, target_lengths = ctc.to_device(batch[2], batch[3].tolist(), device=device)
        loss, grad = _loss_and_grad(ctc.ctc_loss, logits, targets, input_lengths, target_lengths, 39)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch_loss, torch_grad = _torch(logits, targets, batch[2], batch[3], blank=39)
    torch.testing.assert_close(loss, torch_loss, rtol=1e-5, atol=0)
    assert (grad - torch_grad).abs().max() <= 2e-3 * torch_grad.abs().max()  # float32 rounding, as on a CPU

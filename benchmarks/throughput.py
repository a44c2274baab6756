"""Training throughput, ours against the HF Trainer doing the same job, side by side in one run.

    python benchmarks/throughput.py [steps=150] [profile=true]
    python benchmarks/throughput.py ours_only=true model.freeze_finetune_updates=1000   # any config override

Same tiny architecture (conf/model/tiny.yaml), same random initialisation, same demo training data,
same optimizer (AdamW, lr, betas, eps, weight decay, linear schedule with warm-up), gradient clipping
1.0, float32, the same number of optimizer updates and the same audio per update on average: the HF
Trainer gets `train_sampling_strategy="group_by_length"` and the clip count per batch that gives as many
batches per epoch as our `data.max_batch_seconds`. The HF side follows run_speech_recognition_ctc.py:
audio decoded and normalised once by `datasets.map` before training (not timed), padded by a collator.
Ours decodes in its loader workers while it trains (timed). Validation is off on both sides.

Prints audio-seconds per second of training (real audio, padding excluded) and the ratio. With
profile=true, also Lightning's simple profiler for our run: where a step's time goes. The settings and
their defaults: conf/bench/throughput.yaml (`--help`); any other key=value overrides our run's train config.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from asr.core import audio  # noqa: E402
from asr.tools import cli  # noqa: E402

# train.py's run without what is not training: no logger, no checkpoints, no progress bar, no evaluation
OVERRIDES = ["logger=none", "~callbacks.checkpoint", "~callbacks.last", "data.num_workers=2",
             "run_dir=/tmp/throughput-benchmark"]


def ours(cfg, steps: int, profile: bool) -> dict:
    """train.py's run (`asr.run.training.assemble`) for `steps` updates; `initial`: its weights before the first."""
    from asr.run.training import assemble

    run = assemble(cfg, max_steps=steps, max_time=None, limit_val_batches=0, enable_progress_bar=False,
                   enable_model_summary=False, profiler="simple" if profile else None)
    initial = {k: v.clone() for k, v in run.model.model.state_dict().items()}
    run.fit()
    if profile:
        print(run.trainer.profiler.summary())
    report = run.report
    return {"audio_seconds": report.audio_seconds, "seconds": report.train_seconds,
            "padding": 1 - report.audio_seconds / report.padded_seconds, "initial": initial, "data": run.data}


def clips_per_batch(data) -> int:
    """The HF Trainer's clips per batch that make as many batches per epoch as our batch budget."""
    return max(1, round(len(data.load("train")) / len(data.train_dataloader().batch_sampler)))


def hf_trainer(cfg, steps: int, clips_per_batch: int, data, model, callbacks=(), seen=None, flops=None) -> dict:
    """model: the HF Wav2Vec2ForCTC, with our initial weights (feature encoder frozen as in ours). On the GPU
    if there is one, in cfg's precision, with its gradient checkpointing. `seen` (audio seconds, and FLOPs by
    `flops(lengths)`) is counted by the collator; `callbacks` are HF TrainerCallbacks."""
    import datasets
    from transformers import Trainer, TrainingArguments

    utterances = data.load("train")
    table = datasets.Dataset.from_dict({"path": [u.path for u in utterances], "text": [u.text for u in utterances]})

    def prepare(row):  # as run_speech_recognition_ctc.py: decode, normalise, tokenize, keep the length
        values = audio.normalize(audio.load(row["path"]))
        from asr.core.text import normalize
        return {"input_values": values, "input_length": len(values),
                "labels": data.vocab.encode(normalize(row["text"], cfg.data.language))}

    table = table.map(prepare, remove_columns=["path", "text"])
    seen = {} if seen is None else seen
    seen.update(audio=0.0, padded=0.0, flops=0.0)

    def collate(features):  # DataCollatorCTCWithPadding: pad inputs with 0 and mask, labels with -100
        lengths = [len(f["input_values"]) for f in features]
        longest = max(lengths)
        values = torch.zeros(len(features), longest)
        mask = torch.zeros(len(features), longest, dtype=torch.long)
        labels = torch.full((len(features), max(len(f["labels"]) for f in features)), -100)
        for i, f in enumerate(features):
            values[i, : lengths[i]] = torch.tensor(f["input_values"])
            mask[i, : lengths[i]] = 1
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
        seen["audio"] += sum(lengths) / audio.SAMPLE_RATE
        seen["padded"] += len(features) * longest / audio.SAMPLE_RATE
        if flops is not None:
            seen["flops"] += flops(lengths)
        return {"input_values": values, "attention_mask": mask, "labels": labels}

    args = TrainingArguments(
        output_dir="/tmp/hf-trainer-benchmark", per_device_train_batch_size=clips_per_batch,
        train_sampling_strategy="group_by_length", length_column_name="input_length",
        learning_rate=cfg.optim.lr, adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, lr_scheduler_type="linear",
        warmup_steps=int(cfg.sched.warmup_ratio * steps), max_steps=steps, max_grad_norm=1.0,
        seed=cfg.seed, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=50,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        remove_unused_columns=False, bf16=cfg.trainer.precision.startswith("bf16"),
        fp16=cfg.trainer.precision.startswith("16"),
        **({"gradient_checkpointing": True} if cfg.model.gradient_checkpointing else {}),
    )
    trainer = Trainer(model=model, args=args, train_dataset=table, data_collator=collate, callbacks=list(callbacks))
    started = time.perf_counter()
    trainer.train()
    return {"audio_seconds": seen["audio"], "seconds": time.perf_counter() - started,
            "padding": 1 - seen["audio"] / seen["padded"]}


def main(argv: list[str]) -> None:
    args, overrides = cli.parse("bench/throughput", argv, passthrough=True)  # the others: the train config's
    from asr.core.config import compose

    cfg = compose("train", OVERRIDES + overrides)
    torch.manual_seed(cfg.seed)
    mine = ours(cfg, args.steps, args.profile)
    data, initial_weights = mine.pop("data"), mine.pop("initial")
    if args.ours_only:
        print(f"\nours, {args.steps} updates, {' '.join(overrides) or 'defaults'}: "
              f"{mine['audio_seconds'] / mine['seconds']:.1f} audio-s/s, padding {mine['padding']:.1%}")
        return
    # The HF model: the same Wav2Vec2ForCTC, with our initial weights.
    from asr.model.module import CTCModel

    initial = CTCModel.from_config(cfg, data.vocab.tokens)
    initial.model.load_state_dict(initial_weights)
    clips = clips_per_batch(data)
    theirs = hf_trainer(cfg, args.steps, clips, data, initial.model)

    print(f"\n{args.steps} optimizer updates, tiny model, demo train split, {torch.get_num_threads()} threads")
    print(f"{'':<40} {'audio s':>8} {'wall s':>7} {'audio-s/s':>9} {'padding':>8}")
    for name, r in ((f"ours (train.py, {cfg.data.max_batch_seconds:.0f} s batches)", mine),
                    (f"HF Trainer (group_by_length, {clips} clips)", theirs)):
        print(f"{name:<40} {r['audio_seconds']:>8.0f} {r['seconds']:>7.1f} "
              f"{r['audio_seconds'] / r['seconds']:>9.1f} {r['padding']:>8.1%}")
    ratio = (mine["audio_seconds"] / mine["seconds"]) / (theirs["audio_seconds"] / theirs["seconds"])
    print(f"ours / HF Trainer: {ratio:.2f}x audio-seconds per second")


if __name__ == "__main__":
    main(sys.argv[1:])

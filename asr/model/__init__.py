"""The model layer: the wav2vec2 network and its frame geometry, the CTC loss, error rates, schedules, speed
(FLOPs, host syncs), and the LightningModule (`asr.model.module.CTCModel`)."""

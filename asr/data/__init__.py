"""The data layer: corpora and their text rules, audio decoding, the checks and the data report, the batch
plan, augmentation, the loaders and the LightningDataModule (`asr.data.module`)."""

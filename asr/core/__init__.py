"""The ground floor, what every layer needs: audio decoding (`audio`), text rules and the vocabulary (`text`),
the encoder's frame geometry (`frames`), checkpoint reading and writing (`checkpoints`) and the composed,
checked config (`config`). It imports nothing from the layers above (data, model, run, tools)."""

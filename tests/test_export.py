"""The export command: a checkpoint as a transformers directory (with an LM: tests/test_transcribe.py)."""

from tests.test_transcribe import run


def test_export_command_names_a_missing_checkpoint(tmp_path):
    result = run("-m", "asr.export", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"out={tmp_path}", check=False)
    assert result.returncode == 1 and "nope.ckpt does not exist" in result.stderr

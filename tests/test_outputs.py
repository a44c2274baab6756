"""What the tools write at out= (`asr.core.outputs`): an out that holds something else is refused in one line before
any work and left as it was, overwrite=true writes it, a tool's own earlier output is replaced or appended to,
names stay apart, and every write is whole or not at all."""

import dataclasses
import json
import re
import shutil

import pytest

import transcribe
from asr import SetupError
from asr.core import outputs
from asr.tools import align
from asr.tools import export as export_tool
from asr.tools import lm as lm_tool
from tests.conftest import in_process

LEDGERED = outputs.Output(tool="tool.py", purpose="a thing", directory=False, example="<dir>/thing.txt", own=None,
                          appends=False)
FOLDER = outputs.Output(tool="tool.py", purpose="a folder of things", directory=True, example="<dir>/things",
                        own=None, appends=False)


def one_line(result) -> str:
    """The failed command's one line on stderr, without a traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


# The rule's functions

def test_a_file_is_the_tools_while_it_holds_what_the_tool_wrote(tmp_path):
    out = tmp_path / "thing.txt"
    assert outputs.claim(out, LEDGERED, overwrite=False) is False  # nothing there
    out.write_text("")
    assert outputs.claim(out, LEDGERED, overwrite=False) is False  # empty: nothing to lose
    out.write_text("mine")
    with pytest.raises(SetupError) as refused:
        outputs.claim(out, LEDGERED, overwrite=False)
    assert str(refused.value) == (f"out={out} exists and is not a thing that tool.py wrote: give another out=, or "
                                  f"overwrite=true to replace it")
    assert outputs.claim(out, LEDGERED, overwrite=True) is False
    outputs.write(out, "written")
    outputs.record(out, LEDGERED)
    assert outputs.claim(out, LEDGERED, overwrite=False) is True  # its own: replaced
    other = dataclasses.replace(LEDGERED, purpose="another thing")
    with pytest.raises(SetupError, match="is not another thing that tool.py wrote"):
        outputs.claim(out, other, overwrite=False)
    out.write_text("written, then corrected by hand")
    with pytest.raises(SetupError, match="exists and is not a thing"):
        outputs.claim(out, LEDGERED, overwrite=False)


def test_a_directory_is_the_tools_once_marked_and_the_wrong_kind_is_refused_whatever_overwrite_says(tmp_path):
    out = tmp_path / "things"
    out.mkdir()
    assert outputs.claim(out, FOLDER, overwrite=False) is False  # empty
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SetupError, match=re.escape(f"out={out} exists and is not a folder of things that tool.py "
                                                   f"wrote: give another out=, or overwrite=true to write into it")):
        outputs.claim(out, FOLDER, overwrite=False)
    assert outputs.claim(out, FOLDER, overwrite=True) is False
    outputs.mark(out, FOLDER)
    assert outputs.claim(out, FOLDER, overwrite=False) is True
    for path, output in ((out, LEDGERED), (out / "notes.txt", FOLDER)):
        with pytest.raises(SetupError, match=r"is a (directory; tool.py writes a thing, a file|file; tool.py writes "
                                             r"a folder of things, a directory): give another out="):
            outputs.claim(path, output, overwrite=True)


def test_names_that_would_collide_stay_apart_by_folder_and_by_extension(tmp_path):
    files = ["rec/monday/x.mp3", "rec/tuesday/x.mp3", "rec/monday/y.mp3", "rec/monday/y.wav"]
    placed = outputs.targets(tmp_path / "subs", files, ".srt")
    assert {f: str(p.relative_to(tmp_path / "subs")) for f, p in placed.items()} == {
        "rec/monday/x.mp3": "monday/x.srt", "rec/tuesday/x.mp3": "tuesday/x.srt",
        "rec/monday/y.mp3": "monday/y.mp3.srt", "rec/monday/y.wav": "monday/y.wav.srt"}
    assert outputs.targets(tmp_path / "one.srt", files[:1], ".srt") == {files[0]: tmp_path / "one.srt"}


def test_a_write_that_fails_leaves_the_old_file_and_no_part_of_the_new(tmp_path):
    out = tmp_path / "results.json"
    outputs.write(out, "old")
    with pytest.raises(RuntimeError), outputs.atomic(out) as f:
        f.write("half of the new")
        raise RuntimeError("killed")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    model = tmp_path / "model"
    outputs.write(model / "kept.txt", "kept")
    with pytest.raises(RuntimeError), outputs.staged(model) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "results.json"]
    with outputs.staged(model) as staging:
        (staging / "lm").mkdir()
        (staging / "lm" / "5gram.arpa").write_text("arpa")
    assert sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file()) == ["kept.txt", "lm/5gram.arpa"]


def test_a_language_an_mms_directory_holds_is_refused_naming_both_checkpoints(tmp_path):
    from asr.model.export import adapters_clash

    first = "/runs/pt-1/checkpoints/last.ckpt"
    (tmp_path / "asr.json").write_text(json.dumps({"base": "b", "base_hash": "0", "adapters": {
        "pt": {"language": "pt", "checkpoint": first}, "es": {"language": "es"}}}))
    with pytest.raises(SetupError) as refused:
        adapters_clash(tmp_path, "pt", "/runs/pt-2/checkpoints/last.ckpt", overwrite=False)
    assert str(refused.value) == (f"out={tmp_path} holds the adapters of target_lang=pt already, exported from "
                                  f"{first}; this export is of /runs/pt-2/checkpoints/last.ckpt: give another "
                                  f"target_lang= (or out=), or overwrite=true to replace them")
    with pytest.raises(SetupError, match="exported from a checkpoint it did not record"):
        adapters_clash(tmp_path, "es", "/runs/es-2/checkpoints/last.ckpt", overwrite=False)
    adapters_clash(tmp_path, "pt", "/runs/pt-2/checkpoints/last.ckpt", overwrite=True)
    adapters_clash(tmp_path, "hy", "/runs/hy/checkpoints/last.ckpt", overwrite=False)


# Through each tool: refused before the model loads (model_path names nothing: its error would come first)

def test_transcribe_refuses_an_archive_that_is_not_one_or_a_directory_before_the_model_loads(tmp_path):
    notes, folder = tmp_path / "notes.txt", tmp_path / "folder"
    notes.write_text("my notes\n")
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "talk.srt").write_text("mine")
    model, clip = tmp_path / "no-model", tmp_path / "clip.wav"
    line = one_line(in_process(transcribe.main, [f"model_path={model}", f"audio={clip}", f"out={notes}"]))
    assert line == (f"error: out={notes} exists and is not a transcript archive that transcribe.py wrote: give "
                    f"another out=, or overwrite=true to replace it")
    line = one_line(in_process(transcribe.main, [f"model_path={model}", f"audio={clip}", f"out={folder}"]))
    assert line == (f"error: out={folder} is a directory; transcribe.py writes a transcript archive, a file: give "
                    f"another out= (<dir>/archive.jsonl)")
    line = one_line(in_process(transcribe.main, [f"model_path={model}", f"audio=[{clip},{tmp_path / 'b.wav'}]",
                                                 "format=srt", f"out={folder}"]))
    assert line.startswith(f"error: out={folder} exists and is not a directory of subtitles that transcribe.py wrote")
    assert notes.read_text() == "my notes\n" and (folder / "a" / "talk.srt").read_text() == "mine"


def test_an_archive_replaced_with_overwrite_then_resumed(barely_trained, cv_corpus, tmp_path):
    clip, model = sorted((cv_corpus / "clips").glob("*.mp3"))[0], barely_trained / "model"
    out = tmp_path / "notes.jsonl"
    out.write_text("not JSON\n")
    assert in_process(transcribe.main, [f"model_path={model}", f"audio={clip}", f"out={out}",
                                        "overwrite=true"]).returncode == 0
    lines = out.read_text().splitlines()
    assert json.loads(lines[0]) == {"transcribed_with": {"model": str(model.resolve())}} and len(lines) == 2
    again = in_process(transcribe.main, [f"model_path={model}", f"audio={clip}", f"out={out}"])
    assert again.returncode == 0 and "1 of 1 files are in" in again.stderr and out.read_text().splitlines() == lines


def test_align_refuses_a_file_or_corpus_it_did_not_write_before_the_model_loads(tmp_path):
    notes, corpus = tmp_path / "talk.TextGrid", tmp_path / "cv" / "pt"
    notes.write_text("corrected by hand")
    corpus.mkdir(parents=True)
    (corpus / "train.tsv").write_text("client_id\tpath\tsentence_id\tsentence\n")  # a Common Voice release
    common = [f"model_path={tmp_path / 'no-model'}", f"audio={tmp_path / 'talk.wav'}", "text=o livro"]
    line = one_line(in_process(align.main, [*common, "format=textgrid", f"out={notes}"]))
    assert line == (f"error: out={notes} exists and is not an alignment that python -m asr.tools.align wrote: give "
                    f"another out=, or overwrite=true to replace it")
    line = one_line(in_process(align.main, [*common, "segment=true", f"out={corpus}"]))
    assert line == (f"error: out={corpus} exists and is not a corpus of segment=true that python -m asr.tools.align "
                    f"wrote: give another out=, or overwrite=true to add to it")
    assert notes.read_text() == "corrected by hand" and [p.name for p in corpus.iterdir()] == ["train.tsv"]


def test_export_refuses_a_checkpoint_or_a_directory_it_did_not_write_and_replaces_its_own(barely_trained, tmp_path):
    ckpt = barely_trained / "checkpoints" / "last.ckpt"
    target = tmp_path / "best.ckpt"
    shutil.copy(ckpt, target)
    for extra in ([], ["overwrite=true"]):
        line = one_line(in_process(export_tool.main, [f"ckpt_path={ckpt}", f"out={target}", *extra]))
        assert line == (f"error: out={target} is a file; python -m asr.tools.export writes an exported model, a "
                        f"directory: give another out= (<dir>/model)")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    line = one_line(in_process(export_tool.main, [f"ckpt_path={ckpt}", f"out={mine}"]))
    assert line.startswith(f"error: out={mine} exists and is not an exported model that python -m asr.tools.export "
                           f"wrote")
    out = tmp_path / "model"
    for _ in range(2):  # its own export, replaced
        result = in_process(export_tool.main, [f"ckpt_path={ckpt}", f"out={out}"])
        assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file()
    assert list(json.loads((out / "asr.json").read_text())) == ["language", "pause_seconds"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # staged, then renamed in


def onnx_hint(checkpoint, clip) -> list[str]:
    """The export command transcribe.py's backend=onnx names for a checkpoint: its ckpt_path=, out=, format=onnx."""
    line = one_line(in_process(transcribe.main, ["backend=onnx", f"model_path={checkpoint}", f"audio={clip}"]))
    command = re.search(r"python -m asr.tools.export (ckpt_path=\S+) (out=\S+) (format=onnx)", line)
    assert command, line
    return list(command.groups())


def test_the_onnx_hint_for_a_checkpoint_names_its_run_and_a_new_directory(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_text("not read: the hint comes first")
    assert onnx_hint(ckpt, tmp_path / "clip.wav") == [f"ckpt_path={ckpt}", f"out={tmp_path / 'run' / 'onnx'}",
                                                      "format=onnx"]
    alone = tmp_path / "last.ckpt"
    shutil.copy(ckpt, alone)
    assert onnx_hint(alone, tmp_path / "clip.wav")[1] == f"out={tmp_path / 'last-onnx'}"


@pytest.mark.slow  # an ONNX export: 15 s on 2 cores
def test_the_onnx_hint_for_a_checkpoint_is_a_command_that_works(barely_trained, cv_corpus, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(barely_trained / "checkpoints" / "last.ckpt", ckpt)
    clip = sorted((cv_corpus / "clips").glob("*.mp3"))[0]
    command = onnx_hint(ckpt, clip)
    exported = in_process(export_tool.main, command)
    assert exported.returncode == 0, exported.stderr
    out = command[1].removeprefix("out=")
    ran = in_process(transcribe.main, ["backend=onnx", f"model_path={out}", f"audio={clip}"])
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr


def test_lm_refuses_a_directory_it_did_not_write_and_rebuilds_its_own(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("o livro azul\no livro verde\n", encoding="utf-8")
    line = one_line(in_process(lm_tool.main, [f"text={corpus}", f"out={tmp_path}", "order=2"]))
    assert line == (f"error: out={tmp_path} exists and is not a language model that python -m asr.tools.lm wrote: "
                    f"give another out=, or overwrite=true to write into it")
    out = tmp_path / "lm"
    for _ in range(2):
        result = in_process(lm_tool.main, [f"text={corpus}", f"out={out}", "order=2"])
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) in (["2gram.arpa", "unigrams.txt"],
                                                     ["2gram.arpa", "2gram.bin", "unigrams.txt"])
    assert (out / "unigrams.txt").read_text().split() == ["azul", "livro", "o", "verde"]

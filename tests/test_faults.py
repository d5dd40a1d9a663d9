"""A killed write never leaves something that looks finished, and the next run cleans what it left."""

import os
import signal
import subprocess
import sys
import time

from tiny_models import build

from mlp_fusion.cli import main

# compress in a child that stops for good halfway through writing the fused checkpoint
HANGING_COMPRESS = """
import sys, time
import mlp_fusion.persistence as persistence
write = persistence._write_fused
def slow(model, directory, tokenizer):
    write(model, directory, tokenizer)
    print("written", flush=True)
    time.sleep(600)
persistence._write_fused = slow
from mlp_fusion.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_when(script: str, args: list[str], signal_line: str) -> None:
    """Run ``script`` with ``args`` in a child, SIGKILL it once it prints ``signal_line``, and wait for it."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert child.stdout.readline().strip() == signal_line
    child.send_signal(signal.SIGKILL)
    child.wait()


def _killed_compress(base, out, *extra):
    kill_when(HANGING_COMPRESS, ["compress", str(base), "--in-memory", "--out", str(out), *extra], "written")


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_killed_compress_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    build("llama").save_pretrained(tmp_path / "base")
    out = tmp_path / "fused"
    _killed_compress(tmp_path / "base", out, "--ratio", "0.5")
    assert not out.exists() and len(_leftovers(out)) == 1  # an unfinished hidden folder, nothing else
    assert main(["compress", str(tmp_path / "base"), "--ratio", "0.5", "--out", str(out)]) == 0
    assert out.is_dir() and _leftovers(out) == []


def test_a_kill_while_overwriting_keeps_the_previous_output(tmp_path):
    build("llama").save_pretrained(tmp_path / "base")
    out = tmp_path / "fused"
    assert main(["compress", str(tmp_path / "base"), "--ratio", "0.5", "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    stamp = os.path.getmtime(out / "fusion.json")
    _killed_compress(tmp_path / "base", out, "--ratio", "0.25", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == before and os.path.getmtime(out / "fusion.json") == stamp
    time.sleep(0.01)
    assert (
        main(["compress", str(tmp_path / "base"), "--ratio", "0.25", "--out", str(out), "--overwrite"]) == 0
    )
    assert _leftovers(out) == []


def test_an_interrupted_swap_puts_the_previous_output_back(tmp_path):
    from mlp_fusion.checkpoint_files import _host, restore_interrupted

    out = tmp_path / "fused"
    old = tmp_path / f".fused.old-{_host()}-{_dead_pid()}-abcd1234"
    old.mkdir()
    (old / "fusion.json").write_text("{}")
    restore_interrupted(out)
    assert (out / "fusion.json").read_text() == "{}" and not old.exists()


def _user_folders(tmp_path) -> list:
    """Folders of the user's next to ``model/`` whose names look like leftovers but are not this library's
    (no host and random suffix; another host's; a live process's)."""
    from mlp_fusion.checkpoint_files import _host

    names = [
        ".model.old-2023-backup",
        f".model.tmp-{_dead_pid()}-mine",
        f".model.tmp-{_dead_pid()}-abcd1234",  # the old pattern, without a host
        f".model.tmp-0badc0de-{_dead_pid()}-abcd1234",  # a writer on another host sharing the disk
        f".model.tmp-{_host()}-{os.getpid()}-abcd1234",  # a live writer here
    ]
    folders = []
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
        folders.append(tmp_path / name)
    return folders


def test_a_refused_save_touches_no_folder_of_the_users(tmp_path, cli):
    model = build("llama")
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier checkpoint: a config with weights beside it
    (out / "model.safetensors").write_bytes(b"")
    folders = _user_folders(tmp_path)
    from mlp_fusion import FusionConfig, fuse, save_pretrained

    fuse(model, FusionConfig(ratio=0.5, layers="0"))
    import pytest

    from mlp_fusion import UserError

    with pytest.raises(UserError, match="already exists"):
        save_pretrained(model, out)
    assert all((folder / "notes.txt").read_text() == "mine" for folder in folders)
    save_pretrained(model, out, overwrite=True)  # a save that goes ahead keeps them too
    assert all((folder / "notes.txt").read_text() == "mine" for folder in folders)
    assert (out / "fusion.json").is_file()


def test_overwrite_never_replaces_a_folder_that_holds_no_checkpoint(tmp_path, cli):
    build("llama").save_pretrained(tmp_path / "base")
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, _, err = cli("compress", tmp_path / "base", "--ratio", "0.5", "--out", out, "--overwrite")
    assert code == 2 and err.count("error:") == 1 and "more than a model checkpoint" in err
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "documents"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# finetune in a child that hangs right after its first checkpoint is written
HANGING_FINETUNE = """
import sys, time
from mlp_fusion.training import finetune as module
def hang(self, args, state, control, **kwargs):
    print("saved", flush=True)
    time.sleep(600)
module._Progress.on_save = hang
from mlp_fusion.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_a_killed_finetune_ends_where_an_uninterrupted_run_ends(capsys, tmp_path):
    import json

    import torch
    from tiny_models import save_tokenizer, write_sentiment_task

    from mlp_fusion import from_pretrained

    build("bert").save_pretrained(tmp_path / "bert")
    save_tokenizer(tmp_path / "bert")
    write_sentiment_task(tmp_path / "data")
    common = [
        "finetune", str(tmp_path / "bert"), "--task", "sst2", "--data", str(tmp_path / "data"), "--ratio", "0.5",
        "--epochs", "2", "--seed", "3", "--lr", "1e-2", "--batch-size", "16", "--max-length", "32",
        "--warmup-ratio", "0", "--json",
    ]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "reference")]) == 0
    reference = json.loads(capsys.readouterr().out)
    out = tmp_path / "run"
    kill_when(HANGING_FINETUNE, [*common, "--out", str(out)], "saved")
    assert not (out / "metrics.json").exists()  # nothing that looks finished
    assert main([*common, "--out", str(out), "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["train_steps"] == reference["train_steps"]
    final, expected = from_pretrained(out).state_dict(), from_pretrained(tmp_path / "reference").state_dict()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-4, atol=1e-5)


# export in a child that hangs after writing its first shard
HANGING_EXPORT = """
import sys, time
import mlp_fusion.shard_io as shard_io
close = shard_io.ShardWriter.close
def slow(self):
    close(self)
    print("written", flush=True)
    time.sleep(600)
shard_io.ShardWriter.close = slow
from mlp_fusion.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_export_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    from mlp_fusion import FusionConfig, fuse, save_pretrained

    model = build("llama")
    fuse(model, FusionConfig(ratio=0.5))
    save_pretrained(model, tmp_path / "fused")
    out = tmp_path / "plain"
    kill_when(HANGING_EXPORT, ["export", str(tmp_path / "fused"), "--out", str(out)], "written")
    assert not out.exists() and len(_leftovers(out)) == 1
    assert main(["export", str(tmp_path / "fused"), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and _leftovers(out) == []

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


def _killed_compress(base, out, *extra):
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HANGING_COMPRESS,
            "compress",
            str(base),
            "--in-memory",
            "--out",
            str(out),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout.readline().strip() == "written"
    child.send_signal(signal.SIGKILL)
    child.wait()
    return child.pid


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
    from mlp_fusion.persistence import clean_interrupted

    out = tmp_path / "fused"
    old = tmp_path / f".fused.old-{_dead_pid()}-abcd1234"
    old.mkdir()
    (old / "fusion.json").write_text("{}")
    clean_interrupted(out)
    assert (out / "fusion.json").read_text() == "{}" and not old.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
